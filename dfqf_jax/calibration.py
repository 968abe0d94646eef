"""Builds a fake-quantized student from a teacher and calibrates its clip values.

Weight clips come from the teacher's weights; activation clips from the full-precision
teacher's inputs to the quantized ReLUs on a few calibration batches (generated images by
default), one clip per batch, averaged over batches, as in the reference code. The rules
themselves are in `dfqf_jax.clip_rules`.
"""
import concurrent.futures
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dfqf_jax import clip_rules, image_sources
from dfqf_jax import quant as q
from dfqf_jax.models.resnet import QUANT_INPUTS, CifarResNet, activation_layer

@functools.lru_cache
def _param_paths(depth: int, num_classes: int, spec: q.QuantSpec) -> tuple:
  """The parameter paths of the quantized model (a trace of its init, done once per spec)."""
  model = CifarResNet(depth, num_classes, quant=spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return tuple(traverse_util.flatten_dict(shapes["params"]))


def quantized_student(teacher_vars: dict, depth: int, num_classes: int, spec: q.QuantSpec):
  """(model, variables): the teacher with fake quantization inserted, clips set to 1."""
  teacher_params = traverse_util.flatten_dict(teacher_vars["params"])
  params = {path: jnp.ones((), jnp.float32) if q.is_clip(path)
            else jnp.asarray(teacher_params[path])
            for path in _param_paths(depth, num_classes, spec)}
  variables = {"params": traverse_util.unflatten_dict(params),
               "batch_stats": jax.tree.map(jnp.asarray, teacher_vars["batch_stats"])}
  return CifarResNet(depth, num_classes, quant=spec), variables


@dataclasses.dataclass
class Summaries:
  """What calibration reads of a teacher and its calibration batches, once, for every bit
  width, protocol and rule in `methods` (see `clip_rules.Summary`).

  weights: kernel's weight_clip path -> Summary of the kernel (signed).
  relu_inputs: act_clip path -> one Summary per batch of that ReLU's input (unsigned), for
  every ReLU that some protocol quantizes (the standard protocol's set includes the dfqf one).
  """

  methods: tuple
  weights: dict
  relu_inputs: dict
  _clips: dict = dataclasses.field(default_factory=dict)

  def clips(self, method: str, wanted: list[tuple[clip_rules.Summary, int]]) -> list[float]:
    """The clips of (tensor summary, bits) pairs, each computed once across protocols."""
    keys = [(id(summary), bits, method) for summary, bits in wanted]
    missing = {key: (summary, bits) for key, (summary, bits) in zip(keys, wanted)
               if key not in self._clips}
    self._clips.update(zip(missing, _in_threads(
        lambda pair: clip_rules.clip(method, *pair), missing.values())))
    return [self._clips[key] for key in keys]


def _in_threads(fn, items) -> list:
  """[fn(item) for item in items] on a thread per core (the NumPy work releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    return list(pool.map(fn, items))


def _summarize_all(tensors: dict, signed: bool, methods) -> dict:
  """path -> Summary of each tensor."""
  return dict(zip(tensors, _in_threads(lambda v: clip_rules.summarize(v, signed, methods),
                                       tensors.values())))


def summarize(teacher_vars: dict, depth: int, num_classes: int, batches, methods) -> Summaries:
  """Reads the teacher's kernels and, on each batch, the inputs of every ReLU a quantized
  student may quantize (full-precision network, BNs in inference mode)."""
  methods = tuple(methods)
  kernels = {path[:-1] + (q.WEIGHT_CLIP,): np.asarray(value) for path, value in
             traverse_util.flatten_dict(teacher_vars["params"]).items() if path[-1] == "kernel"}
  probe = CifarResNet(depth, num_classes, quant=q.QuantSpec(
      q.FULL_PRECISION_BITS, q.FULL_PRECISION_BITS, "standard"))
  record = jax.jit(lambda v, x: probe.apply(v, x, train=False, mutable=[QUANT_INPUTS])[1])
  relu_inputs = {}
  for x in batches:
    recorded = traverse_util.flatten_dict(record(teacher_vars, x)[QUANT_INPUTS])
    tensors = {path[:-1] + (q.ACT_CLIP,): np.asarray(value) for path, (value,) in recorded.items()}
    for path, summary in _summarize_all(tensors, False, methods).items():
      relu_inputs.setdefault(path, []).append(summary)
  return Summaries(methods, _summarize_all(kernels, True, methods), relu_inputs)


def announce(name: str, config, methods) -> None:
  """The line before a calibration (tens of seconds: the teacher on every image)."""
  images = config.calibration_batches * config.calibration_batch_size
  kind = config.calibration_data
  if kind == "generated":  # (DFQF's generator's: "generated")
    kind = image_sources.SOURCES[config.get("images", "dfqf")].images
  print(f"{name}: calibrating the {', '.join(methods)} clips on {images:,} {kind} images",
        file=sys.stderr, flush=True)


def methods_of(spec: q.QuantSpec, method: str) -> list[str]:
  """The clip rules calibrating a student of `spec` with the job's `method` needs: `method`
  and those its rules name."""
  return list(dict.fromkeys([method] + [r.calibration for r in spec.rules if r.calibration]))


def calibrate(variables: dict, spec: q.QuantSpec, method: str, summaries: Summaries) -> dict:
  """Returns the quantized student's `variables` with every clip set by its layer's rule
  (`method` where the rule names none): weight clips from the kernels; activation clips =
  the mean over batches of the per-batch clip."""
  missing = set(methods_of(spec, method)) - set(summaries.methods)
  if missing:
    raise ValueError(f"the summaries were made for {summaries.methods}, not {sorted(missing)}.")
  flat = traverse_util.flatten_dict(variables["params"])
  wanted = {}  # clip path -> (rule, the (summary, bits) pairs whose clips it averages)
  for path in flat:
    if path[-1] == q.WEIGHT_CLIP:
      rule = spec.rule_of(path[:-1])
      wanted[path] = rule, [(summaries.weights[path], rule.weight_bits)]
    elif path[-1] == q.ACT_CLIP:
      rule = spec.rule_of(activation_layer(path[:-1]))
      wanted[path] = rule, [(s, rule.act_bits) for s in summaries.relu_inputs[path]]
  clips = {}
  for rule_method in dict.fromkeys(rule.calibration or method for rule, _ in wanted.values()):
    paths = [p for p, (rule, _) in wanted.items() if (rule.calibration or method) == rule_method]
    computed = iter(summaries.clips(rule_method, [pair for p in paths for pair in wanted[p][1]]))
    clips.update({p: np.mean([next(computed) for _ in wanted[p][1]]) for p in paths})
  for path, clip in clips.items():
    flat[path] = jnp.asarray(max(clip, clip_rules.TINY_CLIP), jnp.float32)
  return {"params": traverse_util.unflatten_dict(flat), "batch_stats": variables["batch_stats"]}
