"""The data-free knowledge distillation iteration (DAFL, DFQF's stage 1): the generator
against the frozen teacher and a student. Stage 1 trains with it; fine-tuning's
`adversarial_generator` option keeps training the generator with it against the quantized
student.

Per iteration, on one batch z ~ N(0, I):
  x = G(z) (G's BNs in training mode); t = T(x) (T's BNs in inference mode, recording the
  batch mean / unbiased variance at every BN input); s = S(x) (S's BNs in training mode);
  G descends L_G = L_IS + lambda_bn L_BN - lambda_adv KL(t || s)   (Adam);
  S descends KL(t || s) on the same, detached images (SGD with step decay).
Both updates use the parameters from before the iteration.

With `single_student_pass` (default) one backward pass gives both gradients: L_G depends on
the student's parameters only through -lambda_adv KL(t || s), and KL's gradient w.r.t. the
student does not depend on whether t and x are detached, so dKL/dθ_S = -dL_G/dθ_S / lambda_adv.
The reference code runs the student twice (once per loss); `single_student_pass=False` does
that too (the student's BN running statistics are then updated twice per iteration).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dfqf_jax import losses as L
from dfqf_jax import parallel
from dfqf_jax.models.generator import Generator, sample_latent
from dfqf_jax.models.layers import BN_INPUT_STATS
from dfqf_jax.models.resnet import CifarResNet


class Models(NamedTuple):
  """The modules of an iteration (in the step's compute dtype)."""
  generator: Generator
  teacher: CifarResNet
  student: CifarResNet


@struct.dataclass
class Hyper:
  """Static settings of one iteration."""
  batch_size: int = struct.field(pytree_node=False)
  latent_dim: int = struct.field(pytree_node=False)
  lambda_is: float = struct.field(pytree_node=False)
  lambda_bn: float = struct.field(pytree_node=False)
  lambda_adv: float = struct.field(pytree_node=False)
  single_student_pass: bool = struct.field(pytree_node=False, default=True)
  # The student's BNs: batch statistics, running statistics updated (stage 1, the reference);
  # False: the running statistics, frozen (fine-tuning's student_bn_train=False).
  student_bn_train: bool = struct.field(pytree_node=False, default=True)


def student_forward(student: CifarResNet, params, batch_stats, x, bn_train: bool):
  """(logits, the student's next batch_stats): BNs in training mode with bn_train, else
  normalizing with the running statistics, which stay as they are."""
  variables = {"params": params, "batch_stats": batch_stats}
  if bn_train:
    s, updates = student.apply(variables, x, train=True, mutable=["batch_stats"])
    return s, updates["batch_stats"]
  return student.apply(variables, x, train=False), batch_stats


def train_step(state, key, teacher_vars, mesh=None):
  """One iteration on a global batch (see the module docstring). `state` has the fields
  step, generator, g_opt_state, student, s_opt_state and, static, models (Models), g_tx,
  s_tx and hp (Hyper): stage 1's GeneratorState and fine-tuning's FinetuneState."""
  generator, teacher, student = state.models
  hp = state.hp
  z = sample_latent(key, hp.batch_size, hp.latent_dim)
  if mesh is not None:
    z = jax.lax.with_sharding_constraint(z, parallel.batch_sharding(mesh))

  def generator_loss(g_params, s_params):
    x, g_updates = generator.apply(
        {"params": g_params, "batch_stats": state.generator["batch_stats"]}, z, train=True,
        mutable=["batch_stats"])
    t, recorded = teacher.apply(teacher_vars, x, train=False, mutable=[BN_INPUT_STATS])
    s, s_stats = student_forward(student, s_params, state.student["batch_stats"], x,
                                 hp.student_bn_train)
    loss_is, h_cond, h_marg = L.inception_score_loss(t, hp.lambda_is)
    loss_bn = L.bn_statistics_loss(recorded[BN_INPUT_STATS], teacher_vars["batch_stats"])
    loss_adv = L.kd_loss(t, s)
    loss = loss_is + hp.lambda_bn * loss_bn - hp.lambda_adv * loss_adv
    aux = (x, t, g_updates["batch_stats"], s_stats,
           {"loss_g": loss, "loss_is": loss_is, "entropy_conditional": h_cond,
            "entropy_marginal": h_marg, "loss_bn": loss_bn, "loss_adv": loss_adv})
    return loss, aux

  (_, (x, t, g_stats, s_stats, metrics)), (g_grads, s_adv_grads) = jax.value_and_grad(
      generator_loss, argnums=(0, 1), has_aux=True)(
          state.generator["params"], state.student["params"])

  if hp.single_student_pass:
    s_grads = jax.tree.map(lambda g: -g / hp.lambda_adv, s_adv_grads)
  else:
    x, t = jax.lax.stop_gradient(x), jax.lax.stop_gradient(t)

    def student_loss(s_params):
      s, stats = student_forward(student, s_params, s_stats, x, hp.student_bn_train)
      return L.kd_loss(t, s), stats

    (_, s_stats), s_grads = jax.value_and_grad(student_loss, has_aux=True)(
        state.student["params"])

  g_updates, g_opt_state = state.g_tx.update(g_grads, state.g_opt_state,
                                             state.generator["params"])
  s_updates, s_opt_state = state.s_tx.update(s_grads, state.s_opt_state,
                                             state.student["params"])
  new_state = state.replace(
      step=state.step + 1,
      generator={"params": optax.apply_updates(state.generator["params"], g_updates),
                 "batch_stats": g_stats},
      g_opt_state=g_opt_state,
      student={"params": optax.apply_updates(state.student["params"], s_updates),
               "batch_stats": s_stats},
      s_opt_state=s_opt_state)
  probs = jax.nn.softmax(t)
  histogram = jnp.bincount(jnp.argmax(t, -1), length=t.shape[-1]) / t.shape[0]
  metrics.update(teacher_max_prob=probs.max(-1).mean(),
                 class_histogram_entropy=L.entropy(histogram))
  return new_state, metrics
