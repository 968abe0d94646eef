"""Run records for docs/results/, results tables, curves and image grids."""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

import jax

from dfqf_jax import training

STAGE_DIRS = ("teacher", "generator")


def hardware() -> str:
  devices = jax.devices()
  kind = devices[0].device_kind
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = f"{names[0]} x{len(names)} threads" if names else cpu
  except OSError:
    pass
  return (f"{jax.device_count()} x {kind} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es); host: {cpu}")


def git_commit() -> str:
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def curves(workdir: str) -> dict:
  """stage -> metric -> [[step, value], ...] from each stage's metrics.jsonl."""
  result = {}
  for entry in sorted(os.listdir(workdir)):
    rows = training.read_metrics(os.path.join(workdir, entry))
    if not rows:
      continue
    keys = sorted({k for r in rows for k in r if k != "step"})
    result[entry] = {k: [[r["step"], r[k]] for r in rows if k in r] for k in keys}
  return result


def record_run(path: str, workdir: str, results: dict, wall_seconds: float) -> dict:
  """Writes the run record JSON (atomically) and returns it."""
  record = {
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "commit": git_commit(),
      "hardware": hardware(),
      "wall_seconds": round(wall_seconds, 1),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "workdir": os.path.abspath(workdir),
      "results": results,
      "curves": curves(workdir),
  }
  if training.is_main_process():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid = os.path.join(workdir, "generator", "grid.png")
    if os.path.exists(grid):
      record["grid"] = os.path.basename(path).removesuffix(".json") + "_grid.png"
      shutil.copyfile(grid, os.path.join(os.path.dirname(os.path.abspath(path)), record["grid"]))
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
  return record
