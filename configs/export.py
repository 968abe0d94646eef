"""Integer deployment: export a quantized student as integer codes. Arg: the student's
folder name (default student_w4a4); 'smoke' is accepted and means the default (the export
has no schedule, and the smoke pipeline's student is student_w4a4).

python main.py --config=configs/export.py --workdir=DIR [--config.student=student_w4a4]
writes DIR/export/<student>/ (model.json, weights.npz, model.stablehlo); `evaluate` then
scores it as export_<student>. Needs DIR/<student> (a finetune or ptq checkpoint).
"""
from configs.common import base_config


def get_config(arg: str = ""):
  config = base_config("export")
  config.student = "student_w4a4" if arg in ("", "smoke") else arg
  # Optional check: the bit widths the student must have (e.g. 'w4a4'); '' = the checkpoint's.
  config.bits = ""
  return config
