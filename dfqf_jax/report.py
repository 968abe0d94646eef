"""Run records for docs/results/, results tables, curves and image grids."""
import datetime
import json
import os
import re
import sys

import jax

from dfqf_jax import checkpoints, provenance, storage, training

STAGE_DIRS = ("teacher", "generator")


def hardware() -> str:
  kind = jax.devices()[0].device_kind
  return (f"{jax.device_count()} x {kind} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es); host: {provenance.cpu_model()} "
          f"x{os.cpu_count()} threads")


def git_commit() -> str:
  """HEAD, with '+dirty' when tracked files differ from it."""
  commit, dirty = provenance.git_state()
  return commit + ("+dirty" if dirty else "")


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
  record = {
      "command": " ".join([f"{k}={os.environ[k]}" for k in ("XLA_FLAGS", "JAX_PLATFORMS")
                           if os.environ.get(k)] + ["python"] + sys.argv),
      "commit": git_commit(),
      "hardware": hardware(),
      "wall_seconds": round(wall_seconds, 1),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "workdir": storage.absolute(workdir),
      "results": results,
      "stage_wall_seconds": {name: r.get("stage_wall_seconds") for name, r in results.items()},
      # Each stage folder counted once (a stage may hold several models).
      "stage_wall_seconds_total": round(sum(
          {os.path.dirname(r["checkpoint"]): r.get("stage_wall_seconds") or 0.0
           for r in results.values() if "checkpoint" in r}.values()), 1),
      "curves": curves(workdir),
  }
  stopped = {stage: c[training.STOPPED_KEY][-1][0] for stage, c in record["curves"].items()
             if training.STOPPED_KEY in c}
  if stopped:  # a signal ended these stages early: at these steps, short of their schedule
    record["stopped_early_at_step"] = stopped
  if training.is_main_process():
    grid = os.path.join(workdir, "generator", "grid.png")
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
  written = []
  for stage, series in curves(workdir).items():
    keys = [k for k in series if k.endswith("top1")] + [k for k in series
                                                        if k.startswith("loss")]
    if not keys:
      continue
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
      steps, values = zip(*series[key])
      ax.plot(steps, values, marker="o" if len(steps) == 1 else None)  # one point: visible
      ax.set_title(key, fontsize=9)
      ax.set_xlabel("step", fontsize=8)
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

  Also adds `drop_vs_teacher` and the hardware to each entry of DIR/results.json.
  """
  teacher_top1 = results.get("teacher", {}).get("top1")
  host = hardware()
  for name, entry in results.items():
    if teacher_top1 is not None:
      entry["drop_vs_teacher"] = teacher_top1 - entry["top1"]
    entry["hardware"] = host
  order = lambda n: (0 if n == "teacher" else 2 if n.startswith("ptq_") else 1, n)
  lines = [f"# DFQF report ({schedule} schedule)", ""]
  if schedule == "smoke":
    lines += ["The smoke schedule runs a few steps of every stage to show that the pipeline "
              "works end to end; its accuracies say nothing about the method.", ""]
  lines += [f"Hardware: {host}", "",
           "| model | top-1 | drop vs teacher (points) | W/A bits | protocol | calibration | steps | "
           "stage wall time | built from |", "|---|---:|---:|---|---|---|---:|---:|---|"]
  for name in sorted(results, key=order):
    r = results[name]
    bits = f"{r['weight_bits']}/{r['act_bits']}" if "weight_bits" in r else "32/32"
    drop = r.get("drop_vs_teacher")
    lines.append(
        f"| {name} | {100 * r['top1']:.2f}% | {'' if drop is None else f'{100 * drop:.2f}'} "
        f"| {bits} | {r.get('protocol', '')} | {r.get('calibration', '')} | "
        f"{r.get('steps', r.get('step', ''))} | {_seconds(r.get('stage_wall_seconds'))} | "
        f"{built_from(r)} |")
  lines += ["", "Top-1 on the full CIFAR test split of each *final* model (no test-set "
            "selection). Stage wall time includes compilation and per-epoch monitoring. "
            "'Built from': the upstream checkpoints (stage, step, fingerprint of its state).",
            ""]
  if storage.exists(os.path.join(workdir, "generator", "grid.png")):
    lines += ["## Generated images (one row per teacher-predicted class)", "",
              "![grid](generator/grid.png)", ""]
  plots = plot_curves(workdir, workdir) if training.is_main_process() else []
  if plots:
    lines += ["## Training curves", ""] + [f"![{p}]({p})" for p in plots]
  text = "\n".join(lines) + "\n"
  if training.is_main_process():
    storage.write_atomically(os.path.join(workdir, "report.md"), text)
    storage.write_atomically(os.path.join(workdir, "results.json"),
                             json.dumps(results, indent=2, sort_keys=True))
  return text


def built_from(entry: dict) -> str:
  """'generator step 100 (1a2b3c4d)' for each upstream checkpoint except the teacher."""
  return ", ".join(checkpoints.describe_origin(origin) for stage, origin in
                   entry.get("lineage", {}).items() if stage != "teacher")


def ptq_table(results: dict) -> str:
  """Markdown table: rows = calibration x protocol, columns = bit widths (PTQ models)."""
  cells, bit_widths = {}, set()
  for name, r in results.items():
    if name.startswith("ptq_"):
      bits = f"W{r['weight_bits']}A{r['act_bits']}"
      bit_widths.add((r["weight_bits"], bits))
      cells[(r["calibration"], r["protocol"], bits)] = r["top1"]
  columns = [b for _, b in sorted(bit_widths, reverse=True)]
  rows = sorted({(c, p) for c, p, _ in cells})
  lines = ["| calibration | protocol | " + " | ".join(columns) + " |",
           "|---|---|" + "---:|" * len(columns)]
  for calibration, protocol in rows:
    values = [cells.get((calibration, protocol, b)) for b in columns]
    lines.append(f"| {calibration} | {protocol} | " + " | ".join(
        "" if v is None else f"{100 * v:.2f}" for v in values) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  loaded = json.loads(storage.read_text(sys.argv[1]))
  print(ptq_table(loaded.get("results", loaded)))
