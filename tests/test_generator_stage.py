"""Stage 1: the generator ascends the adversarial KL, the student descends it; monitoring."""
import json

import jax
import jax.numpy as jnp
import optax

from cli import run_in_process
from conftest import SMALL_TEACHER_ARGS, copy_workdir

from dfqf_jax import losses as L
from dfqf_jax import dfkd, training
from dfqf_jax.models.generator import Generator, sample_latent
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import generator as stage1


def test_one_iteration_moves_generator_up_and_student_down_the_adversarial_loss():
  teacher, student, generator = CifarResNet(8), CifarResNet(8), Generator(latent_dim=16, width=16)
  t_init = teacher.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  teacher_vars = {"params": t_init["params"], "batch_stats": t_init["batch_stats"]}
  g_tx, s_tx = optax.sgd(1e-3), training.sgd(1e-2, momentum=0.0, weight_decay=0.0)
  # Tiny IS and BN weights: the generator's step is driven by the adversarial term alone.
  hp = dfkd.Hyper(32, 16, lambda_is=1e-9, lambda_bn=1e-9, lambda_adv=5.0)
  state = stage1.initial_state(dfkd.Models(generator, teacher, student), g_tx, s_tx, hp,
                               jax.random.key(0))
  key = jax.random.key(7)
  new, _ = jax.jit(dfkd.train_step)(state, key, teacher_vars)

  def adversarial_kl(g_vars, s_params):
    x = generator.apply(g_vars, sample_latent(key, 32, 16), mutable=["batch_stats"])[0]
    t = teacher.apply(teacher_vars, x)
    s = student.apply({"params": s_params, "batch_stats": state.student["batch_stats"]}, x,
                      train=True, mutable=["batch_stats"])[0]
    return float(L.kd_loss(t, s))

  g_old = {"params": state.generator["params"], "batch_stats": state.generator["batch_stats"]}
  g_new = {"params": new.generator["params"], "batch_stats": state.generator["batch_stats"]}
  before = adversarial_kl(g_old, state.student["params"])
  assert adversarial_kl(g_new, state.student["params"]) > before  # G ascends L_adv
  assert adversarial_kl(g_old, new.student["params"]) < before  # S descends it


def test_the_fp_student_is_measured_on_held_out_training_images(tmp_path, small_data,
                                                              small_teacher_workdir):
  """data.validation_size > 0: student_val_top1_percent (for comparing settings) beside the
  test top-1."""
  tmp_path = copy_workdir(small_teacher_workdir, tmp_path / "run")
  result = run_in_process("configs/generator.py:smoke", tmp_path, *SMALL_TEACHER_ARGS,
                          f"--config.data.dir={small_data}", "--config.data.validation_size=200",
                          "--config.num_epochs=1", "--config.iters_per_epoch=1")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "generator" / "metrics.jsonl") as f:
    evaluations = [row for row in map(json.loads, f) if "student_test_top1_percent" in row]
  assert evaluations and all(0 <= row["student_val_top1_percent"] <= 100 for row in evaluations)
