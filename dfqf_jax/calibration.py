"""Builds a fake-quantized student from a teacher and calibrates its clip values.

Weight clips come from the teacher's weights; activation clips from the full-precision
teacher's activations at the quantization points on a few calibration batches (generated
images by default), averaged over batches, as in the reference code.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dfqf_jax import quant as q
from dfqf_jax.models.resnet import QUANT_INPUTS, CifarResNet

WEIGHT_CLIP, ACT_CLIP = "weight_clip", "act_clip"


def quantized_student(teacher_vars: dict, depth: int, num_classes: int, spec: q.QuantSpec):
  """(model, variables): the teacher with fake quantization inserted, clips set to 1."""
  model = CifarResNet(depth, num_classes, quant=spec)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = traverse_util.flatten_dict(jax.tree.map(lambda _: None, init["params"],
                                                   is_leaf=lambda x: x is None or hasattr(x, "shape")))
  teacher_params = traverse_util.flatten_dict(teacher_vars["params"])
  merged = {}
  for path in params:
    if path[-1] in (WEIGHT_CLIP, ACT_CLIP):
      merged[path] = jnp.ones((), jnp.float32)
    else:
      merged[path] = jnp.asarray(teacher_params[path])
  variables = {"params": traverse_util.unflatten_dict(merged),
               "batch_stats": jax.tree.map(jnp.asarray, teacher_vars["batch_stats"])}
  return model, variables


def weight_clips(params: dict, spec: q.QuantSpec, method: str) -> dict:
  """path -> clip for every weight_clip parameter, from the kernel beside it."""
  flat = traverse_util.flatten_dict(params)
  clips = {}
  for path in flat:
    if path[-1] == WEIGHT_CLIP:
      kernel = np.asarray(flat[path[:-1] + ("kernel",)])
      bits = spec.edge_weight_bits if path[0] in ("conv1", "linear") else spec.weight_bits
      clips[path] = q.calibrate_clip(method, kernel, bits, signed=True)
  return clips


def activation_clips(model_q: CifarResNet, variables: dict, batches, spec: q.QuantSpec,
                     method: str) -> dict:
  """path -> clip for every act_clip: the mean over batches of the per-batch clip.

  Activations are those of the full-precision network (same weights, no quantization,
  BNs in inference mode) at the student's quantization points.
  """
  probe = CifarResNet(model_q.depth, model_q.num_classes,
                      quant=q.QuantSpec(q.FULL_PRECISION_BITS, q.FULL_PRECISION_BITS,
                                        spec.protocol))
  fp_params = {k: v for k, v in traverse_util.flatten_dict(variables["params"]).items()
               if k[-1] not in (WEIGHT_CLIP, ACT_CLIP)}
  fp_vars = {"params": traverse_util.unflatten_dict(fp_params),
             "batch_stats": variables["batch_stats"]}
  record = jax.jit(lambda v, x: probe.apply(v, x, train=False, mutable=[QUANT_INPUTS])[1])
  per_batch = {}
  for x in batches:
    recorded = traverse_util.flatten_dict(record(fp_vars, x)[QUANT_INPUTS])
    for path, (value,) in recorded.items():
      clip_path = path[:-1] + (ACT_CLIP,)
      per_batch.setdefault(clip_path, []).append(
          q.calibrate_clip(method, np.asarray(value), spec.act_bits, signed=False))
  return {path: float(np.mean(values)) for path, values in per_batch.items()}


def calibrate(model_q: CifarResNet, variables: dict, batches, spec: q.QuantSpec,
              method: str) -> dict:
  """Returns `variables` with every weight and activation clip set by `method`."""
  flat = traverse_util.flatten_dict(variables["params"])
  clips = weight_clips(variables["params"], spec, method)
  if spec.act_bits != q.FULL_PRECISION_BITS:
    clips.update(activation_clips(model_q, variables, batches, spec, method))
  missing = [p for p in flat if p[-1] in (WEIGHT_CLIP, ACT_CLIP) and p not in clips]
  assert not missing, f"uncalibrated clips: {missing}"
  for path, clip in clips.items():
    flat[path] = jnp.asarray(max(clip, 1e-8), jnp.float32)
  return {"params": traverse_util.unflatten_dict(flat), "batch_stats": variables["batch_stats"]}
