"""The losses of the field's two baselines that replace DFQF's generator as the student's image
source: ZeroQ's distilled-data loss and GDFQ's generator and student losses.

Both read the teacher's BN inputs, captured as the outputs of the convolutions that feed the
BNs (ZeroQ's hooks sit on the convolutions, GDFQ's on the BNs; in a CIFAR ResNet every BN
follows a convolution, so they see the same tensors). docs/fidelity_zeroq_gdfq.md gives the
source of every formula and setting.
"""
import jax
import jax.numpy as jnp
from flax import traverse_util

from dfqf_jax.losses import cross_entropy
from dfqf_jax.models.resnet import QuantConv

ZEROQ_EPS = 1e-6  # added to every variance before its square root (distill_data.py)
KD_REDUCTIONS = ("elementwise_mean", "batchmean")


def _is_conv_call(module, method_name: str) -> bool:
  return isinstance(module, QuantConv) and method_name == "__call__"


def teacher_bn_inputs(teacher, teacher_vars, x):
  """(logits, [(BN input, running mean, running var), one per BN layer]) of the teacher in
  inference mode. A BN `.../bnK` reads the output of `.../convK`."""
  logits, state = teacher.apply(teacher_vars, x, train=False,
                                capture_intermediates=_is_conv_call)
  running = traverse_util.flatten_dict(teacher_vars["batch_stats"])
  layers = []
  for path, (value,) in traverse_util.flatten_dict(state["intermediates"]).items():
    *parents, conv, _ = path
    bn = (*parents, conv.replace("conv", "bn"))
    layers.append((value, running[bn + ("mean",)], running[bn + ("var",)]))
  if 2 * len(layers) != len(running):
    raise ValueError(f"{len(layers)} convolutions feed the teacher's {len(running) // 2} BNs; "
                     "ZeroQ's and GDFQ's losses need one convolution before every BN.")
  return logits, layers


def per_image_statistics(x, eps: float = ZEROQ_EPS):
  """Per image and channel: the mean and sqrt(unbiased variance + eps) over the spatial
  positions of NHWC `x` (ZeroQ's tmp_mean, tmp_std). Returns two [N, C] arrays."""
  flat = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
  return flat.mean(1), jnp.sqrt(flat.var(1, ddof=1) + eps)


def zeroq_image_losses(images, layers, input_statistics: bool = True, eps: float = ZEROQ_EPS):
  """ZeroQ's loss per image: sum over BN layers of ||mu_BN - mean_n||^2 + ||sigma_BN - std_n||^2
  with sigma_BN = sqrt(running var + eps), plus (input_statistics) the same term for the
  images themselves against mean 0, std 1. A batch's loss (ZeroQ's own_loss, ||.||^2 / N
  summed over layers) is the mean of these over its images. Returns [N]."""
  targets = [(x, mean, jnp.sqrt(var + eps)) for x, mean, var in layers]
  if input_statistics:
    channels = images.shape[-1]
    targets.append((images, jnp.zeros(channels), jnp.ones(channels)))
  total = 0.0
  for x, target_mean, target_std in targets:
    mean, std = per_image_statistics(x, eps)
    total = total + jnp.square(mean - target_mean).sum(-1) + jnp.square(std - target_std).sum(-1)
  return total


def gdfq_bns_loss(layers):
  """GDFQ's BN-statistics loss: mean over BN layers of MSE(batch mean, running mean) +
  MSE(biased batch variance, running variance), statistics over N, H and W."""
  total = 0.0
  for x, running_mean, running_var in layers:
    x = x.astype(jnp.float32)
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    total = total + jnp.square(mean - running_mean).mean() + jnp.square(var - running_var).mean()
  return total / len(layers)


def gdfq_generator_loss(teacher_logits, labels, layers, lambda_bns: float):
  """L_G = CE(T(G(z|y)), y) + lambda_bns * L_BNS. Returns (loss, ce, bns)."""
  ce = cross_entropy(teacher_logits, labels)
  bns = gdfq_bns_loss(layers)
  return ce + lambda_bns * bns, ce, bns


def gdfq_student_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float,
                      kd_reduction: str = "elementwise_mean"):
  """GDFQ's student loss: alpha T^2 KL(softmax(t/T) || softmax(s/T)) + CE(s, y).

  kd_reduction 'elementwise_mean' is PyTorch's nn.KLDivLoss() default that GDFQ's code uses
  (the sum over classes also divided by the number of classes); 'batchmean' is the KL
  divergence averaged over the batch. Returns (loss, kd, ce)."""
  log_p_s = jax.nn.log_softmax(student_logits / temperature)
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature)
  pointwise = jnp.exp(log_p_t) * (log_p_t - log_p_s)
  kd = pointwise.mean() if kd_reduction == "elementwise_mean" else pointwise.sum(-1).mean()
  ce = cross_entropy(student_logits, labels)
  return alpha * temperature ** 2 * kd + ce, kd, ce
