"""Host time per step of the training loop (`training.run_steps`) around a trivial step.

  python benchmarks/loop_overhead.py [--steps 3000] [--tag TEXT]
      [--out experiments/benchmarks/loop_overhead.jsonl]

A step whose device work is a few microseconds leaves only the host's share: dispatching the
step, deriving its key, and the loop's logging and checkpoint decisions. Once an accelerator
step is a few milliseconds (fine-tuning on a GPU), that share paces the run. Each way of
deriving the step's key is timed in its own loops of `--steps` and twice as many steps;
appends one JSON line.
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dfqf_jax import checkpoints, provenance, rng, training  # noqa: E402

NO_INTERVAL_SAVES = 10**9  # only the final, forced checkpoint
KEYS = {"eager fold_in": jax.random.fold_in, "rng.step_key": rng.step_key}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--tag", default="")
  p.add_argument("--out",
                 default=os.path.join(HERE, "experiments", "benchmarks", "loop_overhead.jsonl"))
  return p.parse_args(argv)


def host_us_per_step(derive_key, steps: int) -> float:
  """(T(2N) - T(N)) / N of whole run_steps calls: what each further step adds, without the
  call's one-off work (the metric writer, the final checkpoint, closing)."""
  step = jax.jit(lambda state, key: ({"w": state["w"] + 1}, {"loss": state["w"].sum()}),
                 donate_argnums=0)
  base = rng.key(0, rng.FINETUNE_LATENTS)
  train_step = lambda state, i: step(state, derive_key(base, i))

  def seconds(total_steps: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
      ckpt = checkpoints.manager(directory, NO_INTERVAL_SAVES)
      started = time.perf_counter()
      training.run_steps(name="loop", ckpt=ckpt, state={"w": jnp.zeros(4)}, start_step=0,
                         total_steps=total_steps, train_step=train_step, meta={},
                         log_every=100)
      return time.perf_counter() - started

  seconds(100)  # compiles
  return (seconds(2 * steps) - seconds(steps)) / steps * 1e6


def main(argv=None):
  args = parse_args(argv)
  provenance.append_row(args.out, {
      "what": "host time per step of training.run_steps around a trivial step",
      "steps": args.steps, "backend": jax.default_backend(),
      "us_per_step": {name: round(host_us_per_step(fn, args.steps), 1)
                      for name, fn in KEYS.items()}}, args.tag)


if __name__ == "__main__":
  main()
