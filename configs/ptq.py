"""Post-training quantization baselines (no fine-tuning). Arg: bit widths, e.g. 'w4a4' or
'w8a8,w6a6,w4a4'.

python main.py --config=configs/ptq.py:w4a4 --workdir=DIR --config.data.dir=../shared/data \
    --config.calibration=max,mse,aciq,kl,ft --config.protocol=dfqf,standard
Needs DIR/teacher and (for generated calibration data) DIR/generator.
"""
from configs.common import base_config


def get_config(bits: str = "w4a4"):
  config = base_config("ptq")
  config.bits = bits
  config.protocol = "dfqf"  # dfqf | standard, or a comma-separated list
  config.calibration = "ft"  # max | mse | aciq | kl | ft, or a comma-separated list
  config.calibration_data = "generated"  # generated | real
  config.calibration_batches = 10
  config.calibration_batch_size = 128
  config.teacher_dir = ""
  config.generator_dir = ""
  return config
