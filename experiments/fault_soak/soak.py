"""Fault-injection soak: SIGKILL or SIGTERM at random points of a whole smoke pipeline, each
followed by a rerun of the same command; every final results.json must equal an
uninterrupted run's (every model's top-1, step, fingerprint and lineage) and no lock may be
left.

  python experiments/fault_soak/soak.py --trials 20 [--work /tmp/fault_soak] \
      [--data-dir DIR_WITH_SMALL_NPZ] [--out experiments/fault_soak/trials.jsonl]

The pipeline is configs/pipeline.py:smoke with the imported ResNet-20 teacher, on
SMALL_NPZ (default: tests' 250 test / 1,000 training images, written if missing), one CPU
device. Trial i aims at stage STAGES[i % len(STAGES)]. Its workdir starts with the
uninterrupted run's folders of the stages before that one (UPSTREAM; none for the import),
so that the run reaches the stage in seconds (the pipeline checks and skips the finished
ones) and a trial costs the stage and what follows, not the whole pipeline. The trial waits
for the line that starts the stage (the pipeline's header, or fine-tuning's calibration
line), sleeps a random part of the time that stage took in the uninterrupted run, then
sends SIGKILL or SIGTERM (drawn from the trial's seed). The kill point is recorded as the
last line the run printed before the signal. Each trial appends one JSON line to --out as
soon as it ends, so an interrupted soak keeps its trials and a rerun runs only the missing
ones (the uninterrupted reference run is kept in --work and reused); --workers N runs N
trials side by side (one process each, after the reference exists).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))

from cli import environment, main_command  # noqa: E402
from conftest import SHARED_DATA, TEACHER_WEIGHTS, write_small_data  # noqa: E402

# stage -> the line (start) that says it has begun
STAGES = {"import": "pipeline: teacher", "stage 1": "pipeline: generator",
          "calibration": "student_w4a4: calibrating", "fine-tuning": "student_w4a4: compiling",
          "ptq": "pipeline: ptq", "evaluation": "pipeline: evaluate",
          "report": "pipeline: report"}
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                        text=True).stdout.strip()
# stage -> the reference's folders a trial aimed at it starts with (finished, untouched)
UPSTREAM = {"import": (), "stage 1": ("teacher",),
            "calibration": ("teacher", "generator"), "fine-tuning": ("teacher", "generator"),
            "ptq": ("teacher", "generator", "student_w4a4"),
            "evaluation": ("teacher", "generator", "student_w4a4", "ptq_w4a4_ft_dfqf",
                           "ptq_w4a4_ft_standard", "ptq_w4a4_max_dfqf",
                           "ptq_w4a4_max_standard")}
UPSTREAM["report"] = UPSTREAM["evaluation"]
# What must be identical, per model of results.json (wall times and hardware may differ).
COMPARED = ("top1", "top1_percent", "step", "origin", "lineage", "test_data", "num_params",
            "checkpoint", "finished")


def command(workdir: str, data_dir: str) -> list[str]:
  return main_command("configs/pipeline.py:smoke", workdir, f"--config.data.dir={data_dir}",
                      f"--config.teacher_weights={TEACHER_WEIGHTS}")


class Run:
  """main.py in a subprocess, its output lines timestamped as they come."""

  def __init__(self, workdir: str, data_dir: str):
    self.started = time.time()
    self.lines: list[tuple[float, str]] = []
    self.process = subprocess.Popen(command(workdir, data_dir), cwd=REPO, env=environment(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append((time.time() - self.started, line.rstrip("\n")))

  def seen(self, start: str) -> float | None:
    """When the first line starting with `start` came (seconds since the start), or None."""
    return next((t for t, line in list(self.lines) if line.startswith(start)), None)

  def wait(self, timeout: float = 1800) -> int:
    code = self.process.wait(timeout)
    self._reader.join(10)
    return code


def stage_times(run: Run, end: float) -> dict[str, tuple[float, float]]:
  """stage -> (start, end) in the uninterrupted run (end: the next stage's start, or the
  run's `end`)."""
  starts = {stage: run.seen(line) for stage, line in STAGES.items()}
  ordered = sorted((t, s) for s, t in starts.items() if t is not None)
  return {s: (t, ordered[i + 1][0] if i + 1 < len(ordered) else end)
          for i, (t, s) in enumerate(ordered)}


def comparable(results: dict) -> dict:
  return {name: {k: entry.get(k) for k in COMPARED} for name, entry in results.items()}


def reference(work: str, data_dir: str) -> tuple[dict, dict]:
  """(results.json, stage times) of the uninterrupted run, made once and kept."""
  folder = os.path.join(work, "reference")
  saved = os.path.join(work, "reference.json")
  if os.path.exists(saved):
    with open(saved) as f:
      kept = json.load(f)
    return kept["results"], kept["stage_times"]
  run = Run(folder, data_dir)
  code = run.wait()
  if code != 0:
    raise SystemExit(f"the uninterrupted run failed ({code}):\n" +
                     "\n".join(l for _, l in run.lines[-30:]))
  with open(os.path.join(folder, "results.json")) as f:
    results = json.load(f)
  wall = time.time() - run.started
  kept = {"results": results, "stage_times": stage_times(run, wall),
          "wall_seconds": round(wall, 1)}
  with open(saved, "w") as f:
    json.dump(kept, f)
  return results, kept["stage_times"]


def trial(index: int, rng: random.Random, work: str, data_dir: str, expected: dict,
          times: dict) -> dict:
  stage = list(STAGES)[index % len(STAGES)]
  signum = rng.choice((signal.SIGKILL, signal.SIGTERM))
  start, end = times[stage]
  delay = round(rng.uniform(0, max(0.5, end - start)), 2)
  workdir = os.path.join(work, f"trial_{index:03d}")
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  for folder in UPSTREAM[stage]:
    shutil.copytree(os.path.join(work, "reference", folder), os.path.join(workdir, folder))
  began = time.time()
  run = Run(workdir, data_dir)
  while run.seen(STAGES[stage]) is None and run.process.poll() is None:
    time.sleep(0.05)
  time.sleep(delay)
  finished_before = run.process.poll() is not None
  before = run.lines[-1][1] if run.lines else ""
  if not finished_before:
    run.process.send_signal(signum)
  interrupted_code = run.wait()
  stopped_lines = [l for _, l in run.lines if l.startswith(("stopped:", "error:"))]
  rerun = Run(workdir, data_dir)
  rerun_code = rerun.wait()
  results_path = os.path.join(workdir, "results.json")
  results = json.load(open(results_path)) if os.path.exists(results_path) else {}
  got, want = comparable(results), comparable(expected)
  differences = sorted(f"{name}.{k}" for name in set(got) | set(want)
                       for k in COMPARED if got.get(name, {}).get(k) != want.get(name, {}).get(k))
  lock_left = os.path.exists(os.path.join(workdir, ".dfqf.lock"))
  record = {"trial": index, "commit": COMMIT, "stage_aimed_at": stage,
            "started_with": list(UPSTREAM[stage]),
            "signal": signal.Signals(signum).name,
            "delay_after_stage_start_s": delay, "last_line_before_signal": before,
            "finished_before_signal": finished_before, "interrupted_exit": interrupted_code,
            "stopped_line": stopped_lines[-1] if stopped_lines else "",
            "rerun_exit": rerun_code, "models": len(results),
            "identical": rerun_code == 0 and not differences, "differences": differences,
            "lock_left": lock_left, "seconds": round(time.time() - began, 1)}
  if record["identical"] and not lock_left:
    shutil.rmtree(workdir)  # kept only when it shows a failure
  return record


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--work", default="/tmp/fault_soak")
  parser.add_argument("--data-dir", default="")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "trials.jsonl"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--worker", type=int, default=0,
                      help="with --workers N: run the trials i with i %% N == WORKER (start "
                           "the N workers once the reference run is kept)")
  parser.add_argument("--workers", type=int, default=1)
  args = parser.parse_args(argv)
  os.makedirs(args.work, exist_ok=True)
  data_dir = args.data_dir or write_small_data(SHARED_DATA, os.path.join(args.work, "data"))
  expected, times = reference(args.work, data_dir)
  done = set()
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {json.loads(line)["trial"] for line in f if line.strip()}
  for index in range(args.trials):
    if index % args.workers != args.worker or index in done:
      continue
    record = trial(index, random.Random(args.seed * 1000 + index), args.work, data_dir,
                   expected, times)
    with open(args.out, "a") as f:  # one write of one line: workers append side by side
      f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
