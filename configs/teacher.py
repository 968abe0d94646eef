"""Stage 0: train the teacher. Arg: 'reference' (METHOD.md recipe, default), 'cpu' or 'smoke'.

python main.py --config=configs/teacher.py --workdir=DIR --config.data.dir=../shared/data
'cpu' is a short schedule for a 2-core CPU: same optimizer, 8 epochs, x0.1 at epochs 5 and 7.
"""
from configs.common import base_config
from dfqf_jax import data


def get_config(schedule: str = "reference"):
  config = base_config("teacher")
  # The normalization the teacher learns with (and later stages read from its checkpoint),
  # and crop + flip augmentation of its training images.
  config.data.mean = data.CIFAR_MEAN
  config.data.std = data.CIFAR_STD
  config.data.augment = True
  config.batch_size = 128
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.num_epochs = 200
  config.lr_milestones = (80, 160)
  config.eval_every_epochs = 1
  config.num_steps = 0  # > 0 overrides num_epochs (smoke runs)
  if schedule == "cpu":
    config.num_epochs = 8
    config.lr_milestones = (5, 7)
  elif schedule == "smoke":
    config.batch_size = 32
    config.num_steps = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
  elif schedule != "reference":
    raise ValueError(f"configs/teacher.py:{schedule} is unknown; use reference, cpu or smoke.")
  return config
