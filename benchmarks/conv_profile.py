"""Where the training steps' time goes: every 3x3 convolution shape of ResNet-20, timed
forward, input-gradient and weight-gradient, in JAX (XLA) and PyTorch, side by side.

  python benchmarks/conv_profile.py [--batch 128] [--repeats 20] [--impl jax,torch]

Appends one JSON line per (impl, shape, pass) to --out (default
experiments/benchmarks/conv_profile.jsonl) with the median time and GFLOP/s (2 * multiply-adds of
the pass / time). A train step's backward runs both gradient passes of every convolution,
so a backend whose gradient passes are slower than its forward pass loses most of its speed
in training while it may still win at evaluation.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from benchmark import append_jsonl  # noqa: E402
from dfqf_jax.provenance import cpu_model, git_state, utc_date  # noqa: E402

# (height = width, in channels, out channels, stride) of ResNet-20's 3x3 convolutions, and
# how many of each shape the network has.
RESNET20_CONVS = ((32, 3, 16, 1, 1), (32, 16, 16, 1, 6), (32, 16, 32, 2, 1),
                  (16, 32, 32, 1, 5), (16, 32, 64, 2, 1), (8, 64, 64, 1, 5))
PASSES = ("forward", "input_grad", "weight_grad")


def flops(batch, size, c_in, c_out, stride) -> float:
  out = size // stride
  return 2.0 * batch * out * out * c_out * 9 * c_in


def median_seconds(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_passes(batch, size, c_in, c_out, stride):
  """Callables for the three passes of one jitted convolution (NHWC, as the models)."""
  import jax
  import jax.numpy as jnp

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, c_in)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)) * 0.1, jnp.float32)
  y = conv(x, k)
  forward = jax.jit(conv)
  input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
  weight_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
  return {"forward": lambda: forward(x, k).block_until_ready(),
          "input_grad": lambda: input_grad(x, k, y).block_until_ready(),
          "weight_grad": lambda: weight_grad(x, k, y).block_until_ready()}


def torch_passes(batch, size, c_in, c_out, stride):
  """The same passes through torch.nn.grad (channels-last, as the reference benchmark)."""
  import torch
  from torch.nn import grad as nn_grad
  import torch.nn.functional as F

  torch.set_num_threads(os.cpu_count())
  x = torch.randn(batch, c_in, size, size).to(memory_format=torch.channels_last)
  k = (torch.randn(c_out, c_in, 3, 3) * 0.1).to(memory_format=torch.channels_last)
  y = F.conv2d(x, k, stride=stride, padding=1)
  return {"forward": lambda: F.conv2d(x, k, stride=stride, padding=1),
          "input_grad": lambda: nn_grad.conv2d_input(x.shape, k, y, stride=stride, padding=1),
          "weight_grad": lambda: nn_grad.conv2d_weight(x, k.shape, y, stride=stride,
                                                       padding=1)}


def versions(impl) -> dict:
  if impl == "jax":
    import jax
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "num_devices": jax.device_count()}
  import torch
  return {"torch": torch.__version__, "backend": "cpu", "threads": torch.get_num_threads()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--impl", default="jax,torch")
  p.add_argument("--out",
                 default=os.path.join(REPO, "experiments", "benchmarks", "conv_profile.jsonl"))
  args = p.parse_args(argv)
  commit, dirty = git_state()
  date = utc_date()
  for impl in args.impl.split(","):
    make = jax_passes if impl == "jax" else torch_passes
    for size, c_in, c_out, stride, count in RESNET20_CONVS:
      for name, fn in make(args.batch, size, c_in, c_out, stride).items():
        seconds = median_seconds(fn, args.repeats)
        gflop = flops(args.batch, size, c_in, c_out, stride) / 1e9
        row = {"impl": impl, "pass": name, "batch": args.batch, "size": size, "c_in": c_in,
               "c_out": c_out, "stride": stride, "convs_in_resnet20": count,
               "ms": round(1e3 * seconds, 3), "gflop_per_s": round(gflop / seconds, 1),
               **versions(impl), "cpu_model": cpu_model(),
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "commit": commit,
               "dirty": dirty, "date": date}
        append_jsonl(args.out, row)
        print(json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
