"""Top-1 is in percent wherever a user reads it, and the fields say so: results.json's
entries (FIELD; DROP_FIELD, in points against the workdir's teacher), the training curves
(metrics named `<split>` + METRIC_SUFFIX), the tables. Records written before the unit was
named hold `top1` (and curves `<split>_top1`) as fractions; the readers here take both."""
FIELD = "top1_percent"
DROP_FIELD = "drop_vs_teacher_points"
METRIC_SUFFIX = "_top1_percent"


def percent(entry: dict) -> float | None:
  """A results entry's top-1 in percent (None if it has none)."""
  if FIELD in entry:
    return entry[FIELD]
  return None if entry.get("top1") is None else 100 * entry["top1"]


def curve(stage_curves: dict, split: str) -> list:
  """[[step, top-1 in percent], ...] of `split` ('test', 'val', ...) from a stage's curves."""
  if split + METRIC_SUFFIX in stage_curves:
    return stage_curves[split + METRIC_SUFFIX]
  return [[step, 100 * value] for step, value in stage_curves.get(split + "_top1", [])]
