"""The like-for-like table: students that differ only in their images' source (DFQF's
generator, ZeroQ's distilled set, GDFQ's conditional generator), over seeds.

One row per source x bit widths x protocol within each (teacher, schedule, recipe) part: top-1 mean
± sample standard deviation, min / max, each run's number with its seed, the `ft` PTQ start
each student was fine-tuned from (its step-0 evaluation) and the compute per run (the image
source's stage + the student's fine-tuning). Below it, each pair of sources in one bits x
protocol cell: the difference of their means against the larger of their two standard
deviations (a difference within it is no finding) and whether their runs' ranges overlap.
Read from run records (`--config.record_to`).
"""
import datetime
import re
import statistics
import sys

from dfqf_jax import top1
from dfqf_jax.image_sources import SOURCES


# Command-line settings that differ between the runs of one setting (seeds, paths) or that
# the tables name otherwise (bits, protocol, images, the network's depth, the compute dtype);
# monitoring and checkpoint cadence are no part of a recipe either.
PER_RUN_SETTINGS = ("workdir", "seed", "record_to", "data.dir", "teacher_weights", "images",
                    "bits", "finetune_stage.protocol", "ptq_stage.bits", "model.depth",
                    "compute_dtype")


def recipe_of(record: dict) -> str:
  """The record's command-line overrides that make its recipe ('' for the schedule's own):
  runs whose recipes are equal are runs of one setting, e.g. its seeds."""
  overrides = re.findall(r"--config\.([\w.]+)=(\S+)", record.get("command", ""))
  return " ".join(f"{name}={value}" for name, value in sorted(overrides)
                  if name not in PER_RUN_SETTINGS and "_every_" not in name)


def seed_of(record: dict, entry: dict) -> int:
  """The student's seed as its checkpoint recorded it, else (records written before) the
  seed the record's command set (--config.seed=N), else the default 0."""
  if "seed" in entry:
    return entry["seed"]
  match = re.search(r"--config\.seed=(\d+)", record.get("command", ""))
  return int(match.group(1)) if match else 0


def start_of(record: dict, name: str):
  """The student's step-0 test top-1 (its calibrated start, %), from the record's curves."""
  points = top1.curve(record.get("curves", {}).get(name, {}), "test")
  return next((value for step, value in points if step == 0), None)


def hardware_of(record: dict, entry: dict) -> str:
  """The machine that computed a results entry: its own, else its record's, else '?'."""
  return entry.get("hardware") or record.get("hardware") or "?"


def _ended(record: dict) -> tuple:
  """A sort key: a run record's end (its `date`; UTC unless it says otherwise), a record
  without one (a workdir's results.json) last."""
  if not record.get("date"):
    return (1, 0.0)
  date = datetime.datetime.fromisoformat(record["date"])
  return (0, date.replace(tzinfo=date.tzinfo or datetime.timezone.utc).timestamp())


def students(records: dict):
  """(path, record, results, name, entry) of each fine-tuned student in the records (path ->
  run record or results.json), once per workdir and name: a workdir's later records hold its
  earlier students again. A stale entry is given too (the caller says what it does with it)
  and does not hide a later, current one. Run records are taken in the order their runs
  ended, so a student is credited to the run that built it, whatever order the paths came
  in."""
  seen = set()
  for path, record in sorted(records.items(), key=lambda item: _ended(item[1])):
    results = record.get("results", record)  # a run record, or a workdir's results.json
    for name, entry in sorted(results.items()):
      key = (record.get("workdir", path), name)
      if not name.startswith("student_") or key in seen:
        continue
      if "stale" not in entry:
        seen.add(key)
      yield path, record, results, name, entry


def foreign_seeds(entry: dict, seed: int) -> list[str]:
  """The upstream checkpoints of the student (its lineage) that recorded a seed other than
  its own, e.g. a fine-tuning run on its own built on another seed's generator."""
  return [f"{stage} of seed {origin['seed']}" for stage, origin in
          sorted(entry.get("lineage", {}).items()) if origin.get("seed", seed) != seed]


def runs(records: dict, schedule_of) -> list[dict]:
  """One entry per fine-tuned student in the records (path -> run record); a student that
  several records of one workdir hold is counted once; stale students are left out, and so
  (with one line on stderr) is a student built on another seed's checkpoints: it is no
  independent run of its seed."""
  found = []
  for path, record, results, name, entry in students(records):
    if "stale" in entry:
      continue
    seed = seed_of(record, entry)
    foreign = foreign_seeds(entry, seed)
    if foreign:
      print(f"{path}: {name} (seed {seed}) left out of the like-for-like table: built on "
            f"{', '.join(foreign)}", file=sys.stderr)
      continue
    teacher = results.get("teacher", {})
    source = entry.get("images", "dfqf")
    source_seconds = record.get("stage_folder_wall_seconds", {}).get(SOURCES[source].stage_dir)
    found.append({
        "source": source, "bits": (entry["weight_bits"], entry["act_bits"]),
        "protocol": entry["protocol"], "seed": seed, "top1": top1.percent(entry),
        "start": start_of(record, name), "finetune_seconds": entry.get("stage_wall_seconds"),
        "source_seconds": source_seconds,
        "part": (top1.percent(teacher), teacher.get("depth"), schedule_of(record),
                 recipe_of(record)),
        "hardware": hardware_of(record, entry)})
  return found


def points(value) -> str:
  """A top-1 or a difference in points, as the tables print it ('–' for none)."""
  return "–" if value is None else f"{value:.2f}"


def spread(values) -> str:
  if not values:
    return "–"
  mean = f"{statistics.mean(values):.2f}"
  return mean + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else " (1 run)")


def _seconds(value) -> str:
  return "?" if value is None else f"{value:.0f}"


def _bits_first(bits: tuple) -> tuple:
  """Sort key: wider weights first, then wider activations."""
  return (-bits[0], -bits[1])


def _difference(better: list, worse: list) -> list[str]:
  """Cells of one pair's row: the difference of the means, the larger standard deviation,
  whether the ranges overlap, and what that makes of the difference."""
  difference = statistics.mean(better) - statistics.mean(worse)
  if min(len(better), len(worse)) < 2:
    return [f"+{difference:.2f}", "–", "–", "no spread yet (a cell has 1 run): no finding"]
  larger_std = max(statistics.stdev(better), statistics.stdev(worse))
  disjoint = min(better) > max(worse)
  if difference <= larger_std:
    verdict = "within the spread: no finding"
  elif disjoint:
    verdict = "beyond the spread, every run above every run"
  else:
    verdict = "beyond the spread, but the runs' ranges overlap"
  return [f"+{difference:.2f}", f"{larger_std:.2f}", "disjoint" if disjoint else "overlap",
          verdict]


def differences(rows: list[dict]) -> list[str]:
  """Markdown lines: each pair of sources within one bits x protocol cell of `rows` (one part),
  the higher mean first; none where no cell has two sources."""
  order = list(SOURCES)
  lines = []
  cells = sorted({(r["bits"], r["protocol"]) for r in rows},
                 key=lambda c: (_bits_first(c[0]), c[1]))
  for bits, protocol in cells:
    tops = {}
    for r in sorted(rows, key=lambda r: order.index(r["source"])):
      if (r["bits"], r["protocol"]) == (bits, protocol):
        tops.setdefault(r["source"], []).append(r["top1"])
    ranked = sorted(tops, key=lambda s: -statistics.mean(tops[s]))
    for i, better in enumerate(ranked):
      for worse in ranked[i + 1:]:
        lines.append(" | ".join([
            f"| W{bits[0]}A{bits[1]}", protocol,
            f"{SOURCES[better].label} − {SOURCES[worse].label}",
            *_difference(tops[better], tops[worse])]) + " |")
  if not lines:
    return []
  return ["Differences between sources (mean − mean, higher first, against the larger of the "
          "two standard deviations; a difference within it is no finding):", "",
          "| bits | protocol | pair | difference, points | larger std | ranges | verdict |",
          "|---|---|---|---:|---:|---|---|", *lines, ""]


def machine_tags(rows: list[dict]) -> dict:
  """hardware -> its tag, '(a)', '(b)', ..., or '' when every row ran on one kind of machine:
  wall times of different machines are not comparable, so each run's compute names its
  machine (hardware_of: the machine that trained the student; its workdir's image stage ran
  there too unless the workdir moved between machines)."""
  kinds = sorted({r["hardware"] for r in rows})
  if len(kinds) == 1:
    return {kinds[0]: ""}
  return {hardware: f"({chr(ord('a') + i)})" for i, hardware in enumerate(kinds)}


def machines_text(machines: dict) -> str:
  """The machines of machine_tags, each after its tag: '(a) 1 x gpu; (b) 2 x cpu'."""
  return "; ".join(f"{tag} {hardware}" if tag else hardware
                   for hardware, tag in machines.items())


def tagged(text: str, row: dict, machines: dict) -> str:
  """`text` of one run, followed by its machine's tag if it has one."""
  tag = machines[row["hardware"]]
  return f"{text} {tag}" if tag else text


def table(records: dict, schedule_of) -> str:
  """Markdown: one section per (teacher, schedule), one row per source x bits x protocol (the
  sources of one bits x protocol cell together), then the differences between them."""
  rows = runs(records, schedule_of)
  if not rows:
    return ""
  order = list(SOURCES)
  lines = []
  for part in sorted({r["part"] for r in rows}, key=str):
    teacher_top1, depth, schedule, recipe = part
    in_part = [r for r in rows if r["part"] == part]
    machines = machine_tags(in_part)
    lines += [f"Like for like: teacher ResNet-{depth} {points(teacher_top1)}% (the same for every "
              f"run), schedule {schedule or '?'}" + (f" with {recipe}" if recipe else "") +
              ", images' source the only change; " +
              machines_text(machines), "",
              "| images | bits | protocol | runs | top-1 mean ± std | min / max | each run "
              "(seed: top-1) | `ft` start (each run) | compute per run, s (image stage of its "
              "workdir, shared by its students, + fine-tuning) |",
              "|---|---|---|---:|---:|---:|---|---|---|"]
    cells = sorted({(r["source"], r["bits"], r["protocol"]) for r in in_part},
                   key=lambda c: (_bits_first(c[1]), c[2], order.index(c[0])))
    for source, bits, protocol in cells:
      group = sorted((r for r in in_part if (r["source"], r["bits"], r["protocol"]) ==
                      (source, bits, protocol)), key=lambda r: r["seed"])
      tops = [r["top1"] for r in group]
      lines.append(" | ".join([
          f"| {SOURCES[source].label}", f"W{bits[0]}A{bits[1]}", protocol, str(len(group)),
          spread(tops), f"{points(min(tops))} / {points(max(tops))}",
          ", ".join(f"{r['seed']}: {points(r['top1'])}" for r in group),
          ", ".join(points(r["start"]) for r in group),
          ", ".join(tagged(f"{_seconds(r['source_seconds'])} + "
                           f"{_seconds(r['finetune_seconds'])}", r, machines)
                    for r in group)]) + " |")
    lines.append("")
    lines += differences(in_part)
  return "\n".join(lines)
