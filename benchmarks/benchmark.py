"""Speed of each stage's step, JAX (this project) and PyTorch (the reference code), side by side.

  python benchmarks/benchmark.py [--stages teacher,generator,finetune,evaluate]
      [--impl jax,torch] [--warmup 2] [--repeats 10] [--generator-batch 256] [--tag TEXT]

For every (implementation, stage) it appends one JSON line to --out (default
experiments/benchmarks/benchmarks.jsonl): images/s and the median step time over --repeats timed
steps after --warmup untimed ones (each step waited for), compile time (JAX: lower + compile,
before the first call), the first call's time, peak memory, and the machine, versions, XLA_FLAGS,
commit and date. Each (implementation, stage) runs in its own child process, so peak memory
is that stage's and one framework's thread pool never competes with the other's; the rows of
one invocation share a `run_id`.
"""
import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid
from typing import Callable, NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import finetune as finetune_config  # noqa: E402  (no JAX import)
from configs import generator as generator_config  # noqa: E402
from configs import teacher as teacher_config  # noqa: E402
from dfqf_jax.provenance import cpu_model, git_state, utc_date  # noqa: E402  (no JAX import either)

STAGES = ("teacher", "generator", "finetune", "evaluate")
IMPLS = ("jax", "torch")
REFERENCE_STUDENT_PASSES = 2  # the reference's stage 1 runs the student twice per iteration
EVALUATE_BATCH = 1000  # dfqf_jax.classifiers.top1_percent's batch


def _names(allowed):
  def parse(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
      raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
    return names
  return parse


def _passes(text):
  values = [int(v) for v in text.split(",")]
  if not values or set(values) - {1, 2}:
    raise argparse.ArgumentTypeError(f"{text!r}: use 1, 2 or 1,2")
  return values


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--stages", type=_names(STAGES), default=list(STAGES))
  p.add_argument("--impl", type=_names(IMPLS), default=list(IMPLS))
  p.add_argument("--teacher-batch", type=int, default=teacher_config.get_config().batch_size)
  p.add_argument("--generator-batch", type=int,
                 default=generator_config.get_config().batch_size)
  p.add_argument("--finetune-batch", type=int, default=finetune_config.get_config().batch_size)
  p.add_argument("--evaluate-batch", type=int, default=EVALUATE_BATCH)
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps first (the first one's time is recorded as first_call_s)")
  p.add_argument("--repeats", type=int, default=10, help="timed steps; step_ms is their median")
  p.add_argument("--out",
                 default=os.path.join(REPO, "experiments", "benchmarks", "benchmarks.jsonl"))
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="JAX: the models' compute dtype; torch: autocast to bfloat16")
  p.add_argument("--student-passes", type=_passes, default=[1],
                 help="JAX stage 1: 1 = the project's default single student pass, 2 = the "
                      "reference's two passes; 1,2 times both (torch always does 2)")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count())
  p.add_argument("--no-unique-check", dest="unique_check", action="store_false",
                 help="torch stage 2: drop the reference's torch.unique assertion in quantize")
  p.add_argument("--tag", default="", help="free text stored with every row")
  p.add_argument("--run-id", default=uuid.uuid4().hex[:12], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.warmup < 1 or args.repeats < 1:
    p.error("--warmup and --repeats must be at least 1")
  return args


def planned_runs(args) -> list[tuple[str, str, int | None]]:
  """(impl, stage, student passes) of every row to measure; passes only for stage 1.
  Stage by stage, so the rows compared side by side are measured next to each other."""
  runs = []
  for stage in args.stages:
    for impl in args.impl:
      if stage != "generator":
        runs.append((impl, stage, None))
      elif impl == "torch":
        runs.append((impl, stage, REFERENCE_STUDENT_PASSES))
      else:
        runs.extend((impl, stage, p) for p in args.student_passes)
  return runs


def run_children(argv, runs, run_id) -> int:
  """One child process per row (a later flag overrides an earlier one); returns failures."""
  failures = 0
  for impl, stage, passes in runs:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--impl", impl,
               "--stages", stage, "--run-id", run_id]
    if passes is not None:
      command += ["--student-passes", str(passes)]
    if subprocess.run(command).returncode:
      print(f"benchmark: {impl} {stage} failed", file=sys.stderr)
      failures += 1
  return failures


# ------------------------------------------------------------------------------ timing
class Measurement(NamedTuple):
  compile_s: float | None  # None: nothing is compiled ahead (eager PyTorch)
  step: Callable[[], None]  # one step, returning once its work is done
  fields: Callable[[], dict]  # backend, devices, versions, threads
  device_peak: Callable[[], tuple[int, str] | None]  # accelerator peak bytes and its kind


def warm_up(step, warmup: int) -> float:
  """Runs `warmup` untimed steps; returns the first one's seconds."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  return first


def timed(step, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
  """Resets the process's peak-RSS mark to its current RSS (Linux); False where it cannot.

  Freed heap memory (e.g. the compiler's) is first handed back to the OS with glibc's
  malloc_trim; otherwise the RSS would stay at the set-up peak and the mark would not move.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass  # not glibc: the mark is still reset, to a higher RSS
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def jax_measurement(stage, batch, passes, args) -> Measurement:
  import jax
  import jax_steps
  bench = jax_steps.build(stage, batch, args.dtype, passes)
  start = time.perf_counter()
  bench.fn.lower(*bench.args).compile()  # jit's cache keeps it: the first call reuses it
  compile_s = time.perf_counter() - start
  step = bench.run  # one step, waited for

  def fields():
    import flax
    import jaxlib
    import optax
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "threads": None,
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                         "flax": flax.__version__, "optax": optax.__version__}}

  def device_peak():
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if all("peak_bytes_in_use" in s for s in stats):
      return max(s["peak_bytes_in_use"] for s in stats), "device_peak_bytes_in_use_max"
    return None

  return Measurement(compile_s, step, fields, device_peak)


def torch_measurement(stage, batch, passes, args) -> Measurement:
  try:
    import torch
  except ImportError:
    sys.exit("benchmark: --impl torch needs PyTorch: "
             "pip install -r benchmarks/requirements.txt (or pass --impl jax)")
  import torch_reference
  torch.set_num_threads(args.torch_threads)
  step = torch_reference.build(stage, batch, args.dtype, args.unique_check)
  cuda = torch.cuda.is_available()

  def fields():
    return {"backend": "cuda" if cuda else "cpu",
            "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
            "num_devices": 1, "threads": torch.get_num_threads(),
            "memory_format": str(torch_reference.MEMORY_FORMAT).removeprefix("torch."),
            "versions": {"torch": torch.__version__},
            **({"unique_check": args.unique_check} if stage == "finetune" else {})}

  def device_peak():
    return (torch.cuda.max_memory_allocated(), "torch_cuda_max_memory_allocated") if cuda \
        else None

  return Measurement(None, step, fields, device_peak)


# ----------------------------------------------------------------------------- records
def measure(impl, stage, passes, args) -> dict:
  """One row. Memory: the accelerator's peak where the framework reports one, else the
  process's peak RSS (set-up, compilation, warm-up and timed steps); `timed_peak_rss_bytes`
  is the peak RSS of the timed steps alone (the mark is reset after warm-up), without the
  compiler's transient memory."""
  batch = getattr(args, f"{stage}_batch")
  build = jax_measurement if impl == "jax" else torch_measurement
  m = build(stage, batch, passes, args)
  first_s = warm_up(m.step, args.warmup)
  setup_rss = peak_rss_bytes()
  can_reset = reset_peak_rss()
  times = timed(m.step, args.repeats)
  timed_rss = peak_rss_bytes()
  memory, memory_kind = m.device_peak() or (max(setup_rss, timed_rss), "process_peak_rss")
  median = statistics.median(times)
  commit, dirty = git_state()
  record = {"stage": stage, "impl": impl, **m.fields(), "batch": batch, "dtype": args.dtype,
            "images_per_s": round(batch / median, 2), "step_ms": round(1e3 * median, 3),
            "step_ms_min": round(1e3 * min(times), 3),
            "step_ms_max": round(1e3 * max(times), 3),
            "compile_s": None if m.compile_s is None else round(m.compile_s, 3),
            "first_call_s": round(first_s, 3), "warmup": args.warmup, "repeats": args.repeats,
            "peak_memory_bytes": memory, "memory_kind": memory_kind,
            "timed_peak_rss_bytes": timed_rss if can_reset else None}
  if passes is not None:
    record["student_passes"] = passes
  record.update(
      cpu_model=cpu_model(), cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
      python=platform.python_version(), commit=commit, dirty=dirty,
      date=utc_date(),
      run_id=args.run_id, tag=args.tag)
  return record


def append_jsonl(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  runs = planned_runs(args)
  if len(runs) > 1:
    return 1 if run_children(argv, runs, args.run_id) else 0
  record = measure(*runs[0], args)
  append_jsonl(args.out, record)
  print(json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())
