"""Stage 2: calibrate + KD fine-tune the quantized student. Arg: bit widths, e.g. 'w4a4'.

python main.py --config=configs/finetune.py:w4a4 --workdir=DIR --config.data.dir=../shared/data
Needs DIR/teacher and DIR/generator. Reference settings (METHOD.md) by default.
`--config.data_source=real` gives the real-data QAT bound (DIR/qat_real_w4a4).
"""
from configs import generator
from configs.common import base_config


def get_config(bits: str = "w4a4"):
  config = base_config("finetune")
  config.bits = bits
  config.protocol = "dfqf"  # dfqf | standard
  config.calibration = "ft"  # max | mse | aciq | kl | ft
  config.calibration_data = "generated"  # generated | real
  config.calibration_batches = 10
  config.calibration_batch_size = 128
  config.data_source = "generated"  # generated | real (the real-data QAT bound)
  config.batch_size = 128
  config.steps_per_epoch = 391
  config.num_epochs = 40
  config.learning_rate = 0.001
  config.lr_milestones = ()  # epochs at which the weights' lr is multiplied by 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.clip_learning_rate = 0.0001
  # The student's BNs in training mode (the reference): their running statistics move to
  # generated-image statistics. False keeps the teacher's statistics frozen.
  config.student_bn_train = True
  # Keep training G adversarially against the quantized student (off in the reference),
  # with stage 1's loss weights and learning rate.
  config.adversarial_generator = False
  stage1 = generator.get_config()
  config.lambda_is, config.lambda_bn = stage1.lambda_is, stage1.lambda_bn
  config.lambda_adv = stage1.lambda_adv
  config.generator_learning_rate = stage1.generator.learning_rate
  config.eval_every_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 391
  config.teacher_dir = ""
  config.generator_dir = ""
  return config
