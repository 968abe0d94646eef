"""Post-training quantization baselines (no fine-tuning). Arg: bit widths, e.g. 'w4a4' or
'w8a8,w6a6,w4a4', with ',smoke' for two rules on two small batches (the tests' scale).

python main.py --config=configs/ptq.py:w4a4 --workdir=DIR --config.data.dir=../shared/data \
    --config.calibration=max,mse,aciq,kl,ft --config.protocol=dfqf,standard
Needs DIR/teacher and (for generated calibration data) DIR/generator.
"""
from configs.common import base_config, bits_and_scale


def get_config(arg: str = "w4a4"):
  bits, smoke = bits_and_scale(arg, "w4a4")
  config = base_config("ptq")
  config.bits = bits
  config.protocol = "dfqf"  # dfqf | standard, or a comma-separated list
  config.rules = ""  # per-layer rules of every model, e.g. 'layer3.*=w8a8' (configs/finetune.py)
  config.calibration = "ft"  # max | mse | aciq | kl | ft, or a comma-separated list
  config.calibration_data = "generated"  # generated | real
  config.calibration_batches = 10
  config.calibration_batch_size = 128
  config.teacher_dir = ""
  config.generator_dir = ""
  if smoke:
    config.calibration = "max,ft"
    config.calibration_batches, config.calibration_batch_size = 2, 16
  return config
