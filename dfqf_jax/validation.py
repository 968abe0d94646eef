"""Config validation before any work: one sentence per problem, naming field, value and fix."""
import os

import jax

from dfqf_jax import data, quant, storage
from dfqf_jax.errors import UserError
from dfqf_jax.models.resnet import DEPTHS
from dfqf_jax.stages.sources import IMAGES


COMPUTE_DTYPES = ("float32", "bfloat16")


# Fine-tuning's adversarial-generator settings -> the stage-1 config field each one is (its
# loss weights and learning rate). Unset in fine-tuning, those the generator was trained with
# (stages/finetune.with_generator_loss_weights); the pipeline sets them from its generator stage.
ADVERSARIAL_FIELDS = {"lambda_is": "lambda_is", "lambda_bn": "lambda_bn",
                      "lambda_adv": "lambda_adv",
                      "generator_learning_rate": "generator.learning_rate"}


class ConfigError(UserError, ValueError):
  """A config field has a value the job cannot use."""


def split_names(text: str) -> list[str]:
  """A comma-separated config value ('max,ft') as a list of names, each once."""
  return list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}.")


def positive(config, field: str, allow_zero: bool = False) -> None:
  value = field_value(config, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (
      value == 0 and not allow_zero):
    _fail(field, value, "a number >= 0" if allow_zero else "a number > 0")


def one_of(config, field: str, allowed) -> None:
  value = field_value(config, field)
  if value not in allowed:
    _fail(field, value, f"one of {list(allowed)}")


def divisible_batch(config, field: str) -> None:
  positive(config, field)
  value, devices = field_value(config, field), jax.device_count()
  if value % devices:
    _fail(field, value, f"a multiple of the {devices} devices")


def field_value(config, field: str):
  """config's value at a dotted field name ('generator.learning_rate')."""
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def common(config, splits=("train", "test")) -> None:
  one_of(config, "data.name", sorted(data.DATASETS))
  one_of(config, "model.depth", DEPTHS)
  one_of(config, "compute_dtype", COMPUTE_DTYPES)
  positive(config, "data.validation_size", allow_zero=True)
  if "log_every_steps" in config:  # (the pipeline's own config leaves these to its stages)
    one_of(config, "on_stale_upstream", ("stop", "rebuild"))
    for field in ("log_every_steps", "checkpoint_every_steps"):
      positive(config, field)
    if len(config.data.mean) != 3 or len(config.data.std) != 3 or min(config.data.std) <= 0:
      _fail("data.std", tuple(config.data.std), "3 positive per-channel values (and 3 means)")
  _data_files(config, splits)


def _data_files(config, splits) -> None:
  """The splits the job reads exist (but in the download cache, which fills itself) and
  their labels fit the dataset."""
  if config.data.dir and config.data.dir != data.TFDS:
    for split in splits:
      path = os.path.join(config.data.dir, f"{config.data.name}_{split}.npz")
      if not storage.isfile(path):
        raise ConfigError(
            f"config.data.dir={config.data.dir!r} has no {config.data.name}_{split}.npz; point "
            f"it at a folder with {config.data.name}_train.npz and {config.data.name}_test.npz, "
            f"or leave it empty to download them into ${data.DATA_DIR_ENV}.")
  for split in splits:
    data.check_labels(config.data.name, split, data.source(config.data))


def bits(config, field: str) -> None:
  one_of(config, field, quant.VALID_BITS)


def teacher(config) -> None:
  common(config)
  divisible_batch(config, "batch_size")
  for field in ("learning_rate", "num_epochs", "eval_every_epochs"):
    positive(config, field)
  for field in ("momentum", "weight_decay", "num_steps"):
    positive(config, field, allow_zero=True)


def import_teacher(config) -> None:
  common(config, splits=())


def evaluate(config) -> None:
  common(config, splits=("test",))


def generator(config) -> None:
  common(config, splits=("train", "test") if config.data.validation_size > 0 else ("test",))
  divisible_batch(config, "batch_size")
  for field in ("iters_per_epoch", "num_epochs", "eval_every_epochs", "lambda_is", "lambda_bn",
                "lambda_adv", "generator.latent_dim", "grid_images", "generator.learning_rate",
                "student.learning_rate"):
    positive(config, field)
  for field in ("student.momentum", "student.weight_decay"):
    positive(config, field, allow_zero=True)
  if config.teacher_dir and not storage.isdir(config.teacher_dir):
    _fail("teacher_dir", config.teacher_dir, "a folder holding a teacher checkpoint")


def bit_pairs(config, field: str = "bits") -> list[tuple[int, int]]:
  """The (weight, activation) bit widths config.<field> names, each once ('W4A4,w4a4' is
  [(4, 4)]), or one ConfigError."""
  value = field_value(config, field)
  try:
    return quant.parse_bits(value)
  except ValueError as e:
    raise ConfigError(f"config.{field}={value!r} is invalid: {e}") from None


def _quantization(config) -> None:
  for w, a in bit_pairs(config):
    for value in (w, a):
      if value not in quant.VALID_BITS:
        _fail("bits", config.bits, f"w<W>a<A> with W, A in {list(quant.VALID_BITS)}")
  for protocol in split_names(config.protocol):
    if protocol not in quant.PROTOCOLS:
      _fail("protocol", config.protocol, f"one of {list(quant.PROTOCOLS)} (comma-separated)")
  for method in split_names(config.calibration):
    if method not in quant.CALIBRATIONS:
      _fail("calibration", config.calibration,
            f"one of {list(quant.CALIBRATIONS)} (comma-separated)")
  one_of(config, "calibration_data", ("generated", "real"))
  for field in ("calibration_batches", "calibration_batch_size"):
    positive(config, field)


def _needs_train_split(config) -> bool:
  return (config.data.validation_size > 0 or config.calibration_data == "real"
          or config.get("data_source") == "real")


def ptq(config) -> None:
  common(config, splits=("train", "test") if _needs_train_split(config) else ("test",))
  _quantization(config)


def finetune(config) -> None:
  common(config, splits=("train", "test") if _needs_train_split(config) else ("test",))
  _quantization(config)
  if len(bit_pairs(config)) != 1 or len(split_names(config.protocol)) != 1 or len(
      split_names(config.calibration)) != 1:
    raise ConfigError("finetune trains one student: give one value each for config.bits "
                      f"({config.bits!r}), config.protocol and config.calibration.")
  one_of(config, "data_source", ("generated", "real"))
  one_of(config, "images", IMAGES)
  if config.images != "dfqf" and (config.adversarial_generator or config.data_source == "real"):
    raise ConfigError(f"config.images={config.images!r} fine-tunes on that source's images; "
                      "config.adversarial_generator and config.data_source='real' are for "
                      "DFQF's generator: leave them at False and 'generated'.")
  if config.adversarial_generator and config.data_source == "real":
    raise ConfigError("config.adversarial_generator=True trains the generator against the "
                      "student on generated images, but config.data_source='real' fine-tunes "
                      "on real images; turn one of them off.")
  divisible_batch(config, "batch_size")
  for field in ("steps_per_epoch", "num_epochs", "learning_rate", "clip_learning_rate",
                "eval_every_epochs"):
    positive(config, field)
  for field in ADVERSARIAL_FIELDS:
    if config[field] is not None:  # None: the generator's own (see configs/finetune.py)
      positive(config, field)
  for field in ("momentum", "weight_decay"):
    positive(config, field, allow_zero=True)
