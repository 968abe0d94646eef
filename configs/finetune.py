"""Stage 2: calibrate + KD fine-tune the quantized student. Arg: bit widths, e.g. 'w4a4',
with ',smoke' for a few steps on a few images (seconds; the tests' scale), e.g. 'w3a3,smoke'.

python main.py --config=configs/finetune.py:w4a4 --workdir=DIR --config.data.dir=../shared/data
Needs DIR/teacher and DIR/generator. Reference settings (METHOD.md) by default.
`--config.data_source=real` gives the real-data QAT bound (DIR/qat_real_w4a4).
"""
from ml_collections import config_dict

from configs.common import base_config, bits_and_scale
from dfqf_jax.config_fields import ADVERSARIAL_FIELDS


def get_config(arg: str = "w4a4"):
  bits, smoke = bits_and_scale(arg, "w4a4")
  config = base_config("finetune")
  config.bits = bits
  config.protocol = "dfqf"  # dfqf | standard
  # Per-layer quantization rules before the protocol's, first match wins:
  # 'PATTERN=w<W>a<A>[:fixed][:<calibration>],...', PATTERN a regular expression matched
  # against the whole layer path ('conv1', 'layer{S}_{B}/conv{K}', 'linear'), e.g.
  # 'layer3.*=w8a8,conv1=w8a8' (mixed precision); ':fixed' keeps the clips calibrated.
  config.rules = ""
  config.calibration = "ft"  # max | mse | aciq | kl | ft
  config.calibration_data = "generated"  # generated | real
  config.calibration_batches = 10
  config.calibration_batch_size = 128
  config.data_source = "generated"  # generated | real (the real-data QAT bound)
  config.data.augment = True  # data_source='real': crop + flip of the training images
  # The generated images' source: dfqf (DIR/generator) | zeroq (DIR/zeroq's distilled set)
  # | gdfq (DIR/gdfq_generator, trained alongside with GDFQ's student loss).
  config.images = "dfqf"
  config.batch_size = 128
  config.steps_per_epoch = 391
  config.num_epochs = 40
  config.learning_rate = 0.001
  config.lr_milestones = ()  # epochs at which the weights' lr is multiplied by 0.1
  config.momentum = 0.9
  config.nesterov = False  # True: Nesterov momentum (GDFQ's student optimizer; DFQF's is not)
  config.weight_decay = 5e-4
  config.clip_learning_rate = 0.0001
  # The student's BNs in training mode (the reference): their running statistics move to
  # generated-image statistics. False keeps the teacher's statistics frozen.
  config.student_bn_train = True
  # Keep training G adversarially against the quantized student (off in the reference),
  # with stage 1's loss weights and learning rate: unset (None), those the generator was
  # trained with (recorded in its checkpoint); a value given here overrides them.
  config.adversarial_generator = False
  for field in ADVERSARIAL_FIELDS:
    config[field] = config_dict.placeholder(float)
  config.eval_every_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 391
  config.teacher_dir = ""
  config.generator_dir = ""
  if smoke:
    config.batch_size, config.steps_per_epoch, config.num_epochs = 16, 2, 1
    config.calibration_batches, config.calibration_batch_size = 2, 16
    config.log_every_steps = 1
  return config
