"""Where a step's time goes: a device profile of the stage-1 iteration and the fine-tuning step.

  python benchmarks/profile_steps.py [--stages generator,finetune] [--steps 20]
      [--out experiments/benchmarks/profile.json] [--trace-dir DIR]

For each stage it builds the step exactly as benchmark.py does (the stage's own jitted,
sharded, state-donating step), then
  * times --steps steps dispatched back to back (waited for once, at the end): the
    steady-state wall time per step, host dispatch overlapping device work as in a run;
  * reads XLA's cost analysis of the compiled step (FLOPs and bytes accessed per step, of
    XLA's own kernels only: on a GPU cuDNN's convolutions are custom calls it leaves out);
  * traces --steps more steps with jax.profiler and sums the device's kernels from the
    Perfetto trace: time per step spent in kernels (by kernel and by kind: convolutions and
    matrix products, fused element-wise / reduction kernels, copies), the device's busy time
    (union of kernel intervals) and its idle time between kernels (launch and host gaps).
On a CPU backend there are no device streams; the XLA threads' events stand in for them.
One JSON document per invocation goes to --out; the raw traces stay in --trace-dir.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

import jax_steps  # noqa: E402  (beside this file)
from dfqf_jax import parallel  # noqa: E402
from dfqf_jax.provenance import git_state  # noqa: E402

BATCHES = {"generator": 512, "finetune": 128}
TOP_KERNELS = 15
# Lines of a device's trace that repeat the stream's kernels at another level.
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "XLA TraceMe", "Source code")


def kernel_kind(name: str) -> str:
  lowered = name.lower()
  if any(k in lowered for k in ("all-reduce", "all-gather", "nccl", "collective")):
    return "collective"
  if any(k in lowered for k in ("memcpy", "memset", "copy_")):
    return "copy"
  if any(k in lowered for k in ("convolution", "conv_", "fprop", "dgrad", "wgrad", "gemm",
                                "xmma", "cutlass", "cudnn", "dot", "matmul", "sm90_", "sm80_")):
    return "convolution_or_matmul"
  if any(k in lowered for k in ("fusion", "reduce", "loop_", "input_", "triton", "scatter",
                                "transpose", "select", "rng", "sort")):
    return "fused_elementwise_or_reduction"
  return "other"


def _load_trace(trace_dir: str) -> list:
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:  # the latest trace
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_kernels(events: list) -> tuple[list, dict]:
  """(complete events run on the device, {(pid, tid): line name} of the lines used)."""
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device_pids = {p for p, n in processes.items() if n.startswith("/device:")}
  if device_pids:
    lines = {k: n for k, n in threads.items()
             if k[0] in device_pids and not n.startswith(DERIVED_LINES)}
  else:  # CPU backend: XLA runs its kernels on the host's XLA threads
    lines = {k: n for k, n in threads.items() if "XLA" in n}
  kernels = [e for e in events
             if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines]
  return kernels, lines


def busy_microseconds(kernels: list) -> float:
  """Length of the union of the kernels' [ts, ts + dur) intervals."""
  total, end = 0.0, -float("inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def summarize_kernels(kernels: list, steps: int) -> dict:
  if not kernels:
    return {"kernels_found": 0}
  window_us = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
  busy_us = busy_microseconds(kernels)
  by_name = collections.defaultdict(lambda: [0, 0.0])
  by_kind = collections.defaultdict(float)
  for e in kernels:
    by_name[e["name"]][0] += 1
    by_name[e["name"]][1] += e["dur"]
    by_kind[kernel_kind(e["name"])] += e["dur"]
  kernel_us = sum(by_kind.values())
  top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
  tf32_us = sum(t for n, (_, t) in by_name.items() if "tf32" in n.lower())
  return {
      "kernels_found": len(kernels),
      "kernels_per_step": round(len(kernels) / steps, 1),
      "kernel_ms_per_step": round(kernel_us / steps / 1e3, 3),
      "device_busy_ms_per_step": round(busy_us / steps / 1e3, 3),
      "trace_window_ms_per_step": round(window_us / steps / 1e3, 3),
      "device_idle_fraction_of_window": round(1 - busy_us / window_us, 4),
      "kernel_ms_per_step_by_kind": {k: round(v / steps / 1e3, 3)
                                     for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
      "share_by_kind": {k: round(v / kernel_us, 4) for k, v in by_kind.items()},
      "tf32_kernel_share": round(tf32_us / kernel_us, 4),
      "mean_kernel_us": round(kernel_us / len(kernels), 2),
      "top_kernels": [{"name": n[:160], "kind": kernel_kind(n), "per_step": round(c / steps, 2),
                       "ms_per_step": round(t / steps / 1e3, 4),
                       "share": round(t / kernel_us, 4)} for n, (c, t) in top],
  }


def profile_stage(stage: str, steps: int, trace_dir: str, warmup: int = 5) -> dict:
  step = jax_steps.build(stage, BATCHES[stage], "float32", student_passes=1)
  started = time.perf_counter()
  compiled = step.fn.lower(*step.args).compile()
  compile_s = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  step.run(warmup)
  started = time.perf_counter()
  step.run(steps)
  wall_s = (time.perf_counter() - started) / steps
  stage_trace = os.path.join(trace_dir, stage)
  with jax.profiler.trace(stage_trace, create_perfetto_trace=True):
    step.run(steps)
  kernels, lines = device_kernels(_load_trace(stage_trace))
  flops, bytes_accessed = cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)
  return {
      "stage": stage, "batch": BATCHES[stage], "steps": steps, "compile_s": round(compile_s, 2),
      "wall_ms_per_step": round(wall_s * 1e3, 3), "steps_per_s": round(1 / wall_s, 2),
      "cost_analysis": {"flops_per_step": flops, "bytes_accessed_per_step": bytes_accessed,
                        "achieved_tflop_per_s": round(flops / wall_s / 1e12, 2),
                        "achieved_gb_per_s": round(bytes_accessed / wall_s / 1e9, 1),
                        "flop_per_byte": round(flops / max(bytes_accessed, 1.0), 2),
                        "counts": "XLA's own kernels; library calls (cuDNN convolutions on "
                                  "a GPU) are custom calls it does not count"},
      "trace_lines": sorted(set(lines.values())),
      "device": summarize_kernels(kernels, steps),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--stages", default="generator,finetune")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "benchmarks", "profile.json"))
  p.add_argument("--trace-dir", default="/tmp/dfqf_profile")
  args = p.parse_args(argv)
  parallel.use_cpu_cores()  # the devices main.py would use
  device = jax.devices()[0]
  commit, dirty = git_state()
  doc = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
         "commit": commit, "dirty": dirty, "backend": device.platform,
         "device_kind": device.device_kind, "num_devices": jax.device_count(),
         "jax": jax.__version__,
         "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": []}
  for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
    doc["stages"].append(profile_stage(stage, args.steps, args.trace_dir))
    print(json.dumps(doc["stages"][-1], indent=1), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(doc, f, indent=1)
  print(f"profile: {args.out}")


if __name__ == "__main__":
  main()
