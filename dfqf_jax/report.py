"""Run records for experiments/, results tables, curves and image grids."""
import argparse
import json
import os
import re
import sys

import jax

from dfqf_jax import (checkpoints, image_sources, images, like_for_like, provenance, scoring,
                      storage, top1, training)
from dfqf_jax import quant as q
from dfqf_jax.errors import UserError, brief
from dfqf_jax.like_for_like import points
from dfqf_jax.models.resnet import layer_sizes

GENERATOR_GRID = f"{image_sources.GENERATOR_DIR}/{images.GRID_FILE}"  # in the workdir

def hardware() -> str:
  kind = jax.devices()[0].device_kind
  return (f"{jax.device_count()} x {kind} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es); host: {provenance.cpu_model()} "
          f"x{os.cpu_count()} threads")


# Read when the process starts (main.py imports this module first): a run of hours can see
# HEAD move on, and its record must name the code it imported, not the checkout's later state.
COMMIT_AT_START = provenance.commit()


def curves(workdir: str) -> dict:
  """stage -> metric -> [[step, value], ...] from each stage's metrics.jsonl."""
  result = {}
  for entry in storage.listdir(workdir):
    rows = training.read_metrics(os.path.join(workdir, entry))
    if not rows:
      continue
    keys = sorted({k for r in rows for k in r if k != "step"})
    result[entry] = {k: [[r["step"], r[k]] for r in rows if k in r] for k in keys}
  return result


def record_run(path: str, workdir: str, results: dict, wall_seconds: float) -> dict:
  """Writes the run record JSON (atomically) and returns it."""
  folder_seconds = {
      entry: seconds for entry in storage.listdir(workdir)
      if (seconds := training.read_wall_time(os.path.join(workdir, entry))) is not None}
  record = {
      "command": provenance.command_line(),
      "commit": COMMIT_AT_START,
      "hardware": hardware(),
      "wall_seconds": round(wall_seconds, 1),
      "date": provenance.utc_date(),
      "workdir": storage.absolute(workdir),
      "results": results,
      "stage_wall_seconds": {name: r.get("stage_wall_seconds") for name, r in results.items()},
      # Every stage folder's, also those that hold no classifier (ZeroQ's images).
      "stage_folder_wall_seconds": folder_seconds,
      "stage_wall_seconds_total": round(sum(folder_seconds.values()), 1),
      "curves": curves(workdir),
  }
  stopped = {stage: c[training.STOPPED_KEY][-1][0] for stage, c in record["curves"].items()
             if training.STOPPED_KEY in c}
  if stopped:  # a signal ended these stages early: at these steps, short of their schedule
    record["stopped_early_at_step"] = stopped
  if training.is_main_process():
    grid = os.path.join(workdir, GENERATOR_GRID)
    if storage.exists(grid):
      record["grid"] = os.path.basename(path).removesuffix(".json") + "_grid.png"
      storage.copyfile(grid, os.path.join(os.path.dirname(storage.absolute(path)),
                                          record["grid"]))
    report_md = os.path.join(workdir, "report.md")
    if storage.exists(report_md):
      record["report"] = _copy_report(report_md, workdir, path)
    storage.write_atomically(path, json.dumps(record, indent=1))
  return record


def _copy_report(report_md: str, workdir: str, record_path: str) -> str:
  """Copies DIR/report.md and the images it shows next to the record, links rewritten."""
  folder = os.path.dirname(storage.absolute(record_path))
  stem = os.path.basename(record_path).removesuffix(".json")
  text = storage.read_text(report_md)
  for image in sorted(set(re.findall(r"\]\(([^)]+\.png)\)", text))):
    copied = f"{stem}_{os.path.basename(image)}"
    storage.copyfile(os.path.join(workdir, image), os.path.join(folder, copied))
    text = text.replace(f"]({image})", f"]({copied})")
  name = f"{stem}_report.md"
  storage.write_atomically(os.path.join(folder, name), text)
  return name


def _seconds(value) -> str:
  return "" if value is None else f"{value:.0f} s"


def plot_curves(workdir: str, path: str) -> list[str]:
  """PNG plots of the stage curves; returns the written file names."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  written = []
  for stage, series in curves(workdir).items():
    keys = [k for k in series if k.endswith(top1.METRIC_SUFFIX)] + [
        k for k in series if k.startswith("loss")]
    if not keys:
      continue
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
      steps, values = zip(*series[key])
      ax.plot(steps, values, marker="o" if len(steps) == 1 else None)  # one point: visible
      ax.set_title(key, fontsize=9)
      ax.set_xlabel("training step", fontsize=8)
      ax.set_ylabel("top-1 (%)" if key.endswith(top1.METRIC_SUFFIX) else "loss", fontsize=8)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
      ax.tick_params(labelsize=7)
    fig.suptitle(stage, fontsize=10)
    fig.tight_layout()
    name = f"curves_{stage}.png"
    storage.save_figure(lambda f, fig=fig: fig.savefig(f, dpi=90, format="png"),
                        os.path.join(path, name))
    plt.close(fig)
    written.append(name)
  return written


def write_report(workdir: str, results: dict, schedule: str) -> str:
  """DIR/report.md: one table (teacher, PTQ baselines, DFQF students), grid and curves.

  Also adds `drop_vs_teacher_points` (except to a `stale` entry, one built from upstream
  checkpoints the workdir no longer holds), the hardware and the schedule to each entry of
  `results` (DIR/results.json).
  """
  teacher_top1 = results.get("teacher", {}).get(top1.FIELD)
  host = hardware()
  for name, entry in results.items():
    if teacher_top1 is not None and "stale" not in entry:
      # (rounded: 91.73 - 85.33 is 6.3999999999999915 in floating point)
      entry[top1.DROP_FIELD] = round(teacher_top1 - entry[top1.FIELD], 6)
    entry["hardware"] = host
    entry["schedule"] = schedule  # (report --compare labels a smoke run's numbers)
  order = lambda n: (0 if n == "teacher" else 2 if n.startswith("ptq_") else 1, n)
  lines = [f"# DFQF report ({schedule} schedule)", ""]
  if schedule == "smoke":
    lines += ["The smoke schedule runs a few steps of every stage to show that the pipeline "
              "works end to end; its accuracies say nothing about the method.", ""]
  lines += [f"Hardware: {host}", "",
           "| model | top-1 | drop vs teacher (points) | W/A bits | quantization rules | "
           "average W/A bits | protocol | calibration | steps | stage wall time | built from |",
           "|---|---:|---:|---|---|---|---|---|---:|---:|---|"]
  for name in sorted(results, key=order):
    r = results[name]
    bits = f"{r['weight_bits']}/{r['act_bits']}" if "weight_bits" in r else "32/32"
    rules, average = quantization_of(r)
    drop = r.get(top1.DROP_FIELD)
    lines.append(
        f"| {name} | {r[top1.FIELD]:.2f}% | {'' if drop is None else f'{drop:.2f}'} "
        f"| {bits} | {rules} | {average} | {r.get('protocol', '')} | "
        f"{r.get('calibration', '')} | "
        f"{r.get('steps', r.get('step', ''))} | {_seconds(r.get('stage_wall_seconds'))} | "
        f"{built_from(r)} |")
  lines += ["", "Top-1 on the full CIFAR test split of each *final* model (no test-set "
            "selection). Stage wall time includes compilation and per-epoch monitoring. "
            "'Built from': the upstream checkpoints (stage, step, fingerprint of its state); "
            "**stale**: built from a checkpoint the workdir no longer holds (rerun the "
            "pipeline with that model requested to rebuild it, or delete its folder).", ""]
  if storage.exists(os.path.join(workdir, GENERATOR_GRID)):
    lines += ["## Generated images (one row per teacher-predicted class)", "",
              f"![grid]({GENERATOR_GRID})", ""]
  plots = plot_curves(workdir, workdir) if training.is_main_process() else []
  if plots:
    lines += ["## Training curves", ""] + [f"![{p}]({p})" for p in plots]
  text = "\n".join(lines) + "\n"
  if training.is_main_process():
    storage.write_atomically(os.path.join(workdir, "report.md"), text)
    storage.write_atomically(os.path.join(workdir, scoring.RESULTS_FILE),
                             json.dumps(results, indent=2, sort_keys=True))
  return text


def layer_rules_of(entry: dict) -> str:
  """The command line's per-layer rules a results entry was built with ('' for none)."""
  return (entry.get("quant") or {}).get("layer_rules", entry.get("layer_rules", ""))


def quantization_of(entry: dict) -> tuple[str, str]:
  """(the rule list, first match first, as a markdown table cell; average weight / activation
  bits over the model's tensors, float ones counting 32) of a results entry: a quantized
  checkpoint (its `quant`) or an integer export (its graph's fields); ('', '32/32') for a
  float model."""
  if entry.get("quant"):
    spec = q.QuantSpec.from_meta(entry)
  elif entry.get("integer"):
    spec = q.QuantSpec.of_export(entry)
  else:
    return "", "32/32"
  w, a = spec.average_bits(layer_sizes(entry["depth"], entry["num_classes"]))
  rules = "; ".join(rule.describe() for rule in spec.rules).replace("|", "\\|")
  return rules, f"{w:.2f}/{a:.2f}"


def built_from(entry: dict) -> str:
  """'generator step 100 (1a2b3c4d)' for each upstream checkpoint except the teacher, or
  why the entry is stale."""
  if "stale" in entry:
    return f"**stale**: {entry['stale']}"
  return ", ".join(checkpoints.describe_origin(origin) for stage, origin in
                   entry.get("lineage", {}).items() if stage != "teacher")


def ptq_table(results: dict) -> str:
  """Markdown table: rows = calibration x protocol, columns = bit widths (PTQ models)."""
  cells, bit_widths = {}, set()
  for name, r in results.items():
    if name.startswith("ptq_"):
      bits = f"W{r['weight_bits']}A{r['act_bits']}"
      bit_widths.add((r["weight_bits"], bits))
      rules = layer_rules_of(r).replace("|", "\\|")
      protocol = r["protocol"] + (f" + {rules}" if rules else "")
      cells[(r["calibration"], protocol, bits)] = top1.percent(r)
  columns = [b for _, b in sorted(bit_widths, reverse=True)]
  rows = sorted({(c, p) for c, p, _ in cells})
  lines = ["| calibration | protocol | " + " | ".join(columns) + " |",
           "|---|---|" + "---:|" * len(columns)]
  for calibration, protocol in rows:
    values = [cells.get((calibration, protocol, b)) for b in columns]
    lines.append(f"| {calibration} | {protocol} | " + " | ".join(
        "" if v is None else f"{v:.2f}" for v in values) + " |")
  return "\n".join(lines)


# Published data-free quantization results for ResNet-20 on CIFAR-10 under the standard
# protocol (every layer at the target bits, per-channel weights), each paper's own table, all
# against a 93.89% full-precision ResNet-20: method -> (W4A4 top-1, W3A3 top-1 or None), in
# percent.
PUBLISHED_TEACHER_TOP1 = 93.89
PUBLISHED_NETWORK = "ResNet-20"  # every published number below is ResNet-20 on CIFAR-10
PUBLISHED = {"GDFQ": (90.25, None), "Qimera": (91.26, None), "IntraQ": (91.49, 77.07),
             "AdaDFQ": (92.31, 84.89), "HAST": (92.36, 86.34), "TexQ": (92.68, 86.47),
             "SynQ": (92.76, 88.11)}
COMPARED_BITS = ((4, 4), (3, 3))


def _compute(record: dict, entry: dict) -> str:
  """'1234.5 s fine-tuning (3849.7 s all stages), <hardware>'."""
  text = f"{entry.get('stage_wall_seconds', '?')} s fine-tuning"
  if "stage_folder_wall_seconds" in record:  # every stage folder, ZeroQ's images included
    text += f" ({round(sum(record['stage_folder_wall_seconds'].values()), 1)} s all stages)"
  elif record.get("stage_wall_seconds_total") is not None:  # records before 2026-12-06
    text += f" ({record['stage_wall_seconds_total']} s all stages)"
  return f"{text}, {like_for_like.hardware_of(record, entry)}"


def schedule_of(record: dict) -> str:
  """The pipeline schedule a run record's command named (configs/pipeline.py:<schedule>),
  with the compute dtype when the command set one ('reference, bfloat16'), else '' (a
  stage's own config, or a workdir's results.json)."""
  command = record.get("command", "")
  match = re.search(r"configs/pipeline\.py:(\w+)", command)
  if not match:
    return ""
  dtype = re.search(r"--config\.compute_dtype=(\w+)", command)
  return match.group(1) + (f", {dtype.group(1)}" if dtype else "")


def comparison_rows(records: dict) -> list[dict]:
  """One row per fine-tuned student in the records (path -> run record or results.json): its
  network (ResNet-<depth>), protocol, the record's pipeline schedule, our teacher's top-1,
  the student's top-1 and drop per bit width, its PTQ starting point (the `ft` clips it was
  fine-tuned from: the PTQ table's entry when the record has one, unless stale, else the
  student's step-0 test top-1), and the compute. A student that several records of one
  workdir hold is counted once. A `stale` student (built from checkpoints its workdir no
  longer held) is left out, with one line on stderr."""
  rows = []
  for path, record, results, name, entry in like_for_like.students(records):
    teacher = top1.percent(results.get("teacher", {}))
    if "stale" in entry:
      print(f"{path}: {name} left out: stale, {entry['stale']}", file=sys.stderr)
      continue
    bits, rules = (entry["weight_bits"], entry["act_bits"]), layer_rules_of(entry)
    start = results.get(q.ptq_name(q.QuantSpec(*bits, entry["protocol"], layer_rules=rules),
                                   "ft"))
    if start is None:
      ptq = like_for_like.start_of(record, name)
    else:
      ptq = None if "stale" in start else top1.percent(start)
    depth = entry.get("depth", results.get("teacher", {}).get("depth"))
    network = "?" if depth is None else f"ResNet-{depth}"
    source = image_sources.SOURCES[entry.get("images", "dfqf")].label
    method = "DFQF (ours)" if source == "DFQF" else f"{source} (this harness)"
    rows.append({"method": f"{method} {name}", "network": network,
                 "protocol": " + ".join(filter(None, [entry["protocol"], rules,
                                                      like_for_like.recipe_of(record)])),
                 "schedule": schedule_of(record) or entry.get("schedule", ""),
                 "teacher": teacher, "bits": bits, "top1": top1.percent(entry),
                 "drop": None if teacher is None else teacher - top1.percent(entry),
                 "ptq_start": ptq, "compute": _compute(record, entry),
                 "finetune_seconds": entry.get("stage_wall_seconds"), "source": path,
                 "hardware": like_for_like.hardware_of(record, entry)})
  return rows


ROW_IDENTITY = ("method", "network", "protocol", "schedule", "teacher", "bits")


def _mean(values):
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def _one_row_per_setting(rows: list[dict]) -> list[dict]:
  """Rows that differ only in their run (seeds of one setting) as one: top-1 'mean ± std
  (n runs)', the mean drop and PTQ start, each run's fine-tuning seconds (tagged with its
  machine when they ran on several) and record."""
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in ROW_IDENTITY), []).append(row)
  merged = []
  for group in groups.values():
    if len(group) == 1:
      merged.append({**group[0], "top1_text": points(group[0]["top1"])})
      continue
    tops = [r["top1"] for r in group]
    machines = like_for_like.machine_tags(group)
    seconds = ", ".join(like_for_like.tagged(str(r["finetune_seconds"]), r, machines)
                        for r in group)
    merged.append({**group[0], "top1_text": f"{like_for_like.spread(tops)} ({len(group)} runs)",
                   "drop": _mean([r["drop"] for r in group]),
                   "ptq_start": _mean([r["ptq_start"] for r in group]),
                   "compute": f"{seconds} s fine-tuning, "
                              f"{like_for_like.machines_text(machines)}",
                   "source": ", ".join(r["source"] for r in group)})
  return merged


def comparison_table(records: dict) -> str:
  """Markdown: our students beside the published numbers, top-1 and drop vs each one's own
  full-precision teacher, one column pair per bit width in COMPARED_BITS; the runs of one
  setting (its seeds) in one row, as their mean."""
  header = ["method", "network", "protocol", "schedule", "FP teacher"]
  for w, a in COMPARED_BITS:
    header += [f"W{w}A{a} top-1", f"W{w}A{a} drop"]
  header += ["PTQ start (ft)", "compute", "source"]
  lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|" + "---:|" * (len(header) - 7)
           + "---|---|---|"]
  rows = _one_row_per_setting(comparison_rows(records))
  for row in rows:
    smoke = row["schedule"].startswith("smoke")
    cells = [row["method"] + (" (smoke run: not a result)" if smoke else ""),
             row["network"], row["protocol"], row["schedule"],
             points(row["teacher"])]
    for bits in COMPARED_BITS:
      mine = row["bits"] == bits
      cells += [row["top1_text"] if mine else "", points(row["drop"]) if mine else ""]
    cells += [points(row["ptq_start"]), row["compute"], row["source"]]
    lines.append("| " + " | ".join(cells) + " |")
  for method, tops in PUBLISHED.items():
    cells = [method, PUBLISHED_NETWORK, "standard", "the paper's",
             points(PUBLISHED_TEACHER_TOP1)]
    for published in tops:
      cells += [points(published),
                points(None if published is None else PUBLISHED_TEACHER_TOP1 - published)]
    cells += ["", "published", "the paper's table"]
    lines.append("| " + " | ".join(cells) + " |")
  if any(row["schedule"].startswith("smoke") for row in rows):
    lines += ["", "Smoke runs train each stage for a few steps to show that the pipeline works; "
              "their numbers say nothing about the method."]
  return "\n".join(lines)


class RecordError(UserError, ValueError):
  """A file given to the report that is not a run record or a workdir's results.json."""


def load_record(path: str) -> dict:
  """A run record or a workdir's results.json (name -> entry with its top-1), checked."""
  fix = ("give a run record written with --config.record_to (e.g. "
         "experiments/budget_resnet20/budget_cpu.json) or a workdir's results.json")
  if not storage.isfile(path):
    raise RecordError(f"no record at {path}; {fix}.")
  try:
    record = json.loads(storage.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    lines = " (one JSON object per line: a log, not a record)" if path.endswith(".jsonl") else ""
    raise RecordError(f"{path} is not a JSON document{lines} ({brief(e)}); {fix}.") from None
  results = record.get("results", record) if isinstance(record, dict) else None
  if not isinstance(results, dict) or not results or not all(
      isinstance(e, dict) and top1.percent(e) is not None for e in results.values()):
    raise RecordError(f"{path} holds no results (name -> an entry with its top-1); {fix}.")
  return record


def _main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dfqf_jax.report",
      description="RECORD: print the record's PTQ table. --compare RECORD [RECORD ...]: our "
                  "students beside the published numbers (also written to --out).")
  parser.add_argument("records", nargs="+", metavar="RECORD",
                      help="a run record (experiments/*/*.json) or a workdir's results.json")
  parser.add_argument("--compare", action="store_true",
                      help="one comparison table over all RECORDs")
  parser.add_argument("--out", default="", help="with --compare: also write the table here")
  args = parser.parse_args(argv)
  if len(args.records) > 1 and not args.compare:
    parser.error("several RECORDs need --compare (one table over all of them)")
  try:
    loaded = {p: load_record(p) for p in args.records}
  except RecordError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.compare:
    record = loaded[args.records[0]]
    print(ptq_table(record.get("results", record)))
    return 0
  table = comparison_table(loaded)
  same_harness = like_for_like.table(loaded, schedule_of)
  if same_harness:
    table = f"{same_harness}\nEach beside the published numbers:\n\n{table}"
  print(table)
  if args.out:
    storage.write_atomically(args.out, table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
