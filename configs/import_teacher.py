"""Stage 0 alternative: import a pretrained PyTorch CIFAR ResNet state dict (.npz).

python main.py --config=configs/import_teacher.py --workdir=DIR \
    --config.weights=../shared/data/resnet20-12fca82f_weights.npz
The default normalization is ImageNet's, the one those weights were trained with.
"""
from configs.common import base_config
from dfqf_jax import data


def get_config():
  config = base_config("import_teacher")
  config.weights = ""
  # The normalization the weights were trained with (recorded in the teacher's checkpoint).
  config.data.mean = data.IMAGENET_MEAN
  config.data.std = data.IMAGENET_STD
  return config
