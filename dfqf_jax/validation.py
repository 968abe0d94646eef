"""Config validation before any work: one sentence per problem, naming field, value and fix."""
import os

import jax

from dfqf_jax import baselines, data, fetch, integer, quant, rng, storage
from dfqf_jax.config_fields import ADVERSARIAL_FIELDS
from dfqf_jax.errors import UserError
from dfqf_jax.image_sources import IMAGES
from dfqf_jax.models.resnet import DEPTHS, layer_paths
from dfqf_jax.stages import gdfq as gdfq_stage


COMPUTE_DTYPES = ("float32", "bfloat16")


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


def generator_width(config, field: str) -> None:
  """The generator's channels: its last block has half as many, so at least 2 and even."""
  value = field_value(config, field)
  if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value % 2:
    _fail(field, value, "an even number >= 2 (the reference's 128)")


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


def seed(config) -> None:
  value = config.seed
  if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= rng.MAX_SEED:
    _fail("seed", value, f"an integer from 0 to {rng.MAX_SEED}")


def common(config, splits=("train", "test")) -> None:
  seed(config)
  one_of(config, "data.name", sorted(data.DATASETS))
  one_of(config, "model.depth", DEPTHS)
  one_of(config, "compute_dtype", COMPUTE_DTYPES)
  positive(config, "data.validation_size", allow_zero=True)
  if "log_every_steps" in config:  # (the pipeline's own config leaves these to its stages)
    one_of(config, "on_stale_upstream", ("stop", "rebuild"))
    for field in ("log_every_steps", "checkpoint_every_steps"):
      positive(config, field)
  if "mean" in config.data:  # (the teacher's own stages: later ones read its checkpoint's)
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


def teacher(config) -> None:
  common(config)
  divisible_batch(config, "batch_size")
  for field in ("learning_rate", "num_epochs", "eval_every_epochs"):
    positive(config, field)
  for field in ("momentum", "weight_decay", "num_steps"):
    positive(config, field, allow_zero=True)


def import_teacher(config) -> None:
  common(config, splits=())
  pretrained = fetch.PRETRAINED.get(config.weights)
  if pretrained and (config.model.depth, config.data.name) != (pretrained.depth,
                                                                pretrained.dataset):
    raise ConfigError(
        f"config.weights={config.weights!r} is a ResNet-{pretrained.depth} trained on "
        f"{pretrained.dataset}, but config.model.depth={config.model.depth} and "
        f"config.data.name={config.data.name!r}; set --config.model.depth={pretrained.depth} "
        f"--config.data.name={pretrained.dataset}.")


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
  generator_width(config, "generator.width")
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


def quant_specs(config) -> list[quant.QuantSpec]:
  """The students config.bits x config.protocol name (in that order), each with the per-layer
  rules config.rules: the one reading of these fields, for the checks here and the stages.
  A rule that cannot be read, or whose pattern matches no layer of config.model.depth's
  ResNet, is one ConfigError."""
  rules = config.get("rules", "")
  specs = [quant.QuantSpec(w, a, protocol, layer_rules=rules)
           for w, a in bit_pairs(config) for protocol in split_names(config.protocol)]
  try:
    unmatched = specs[0].unmatched(layer_paths(config.model.depth)) if specs else []
  except ValueError as e:
    raise ConfigError(f"config.rules={rules!r} is invalid: {e}") from None
  if unmatched:
    paths = layer_paths(config.model.depth)
    raise ConfigError(
        f"config.rules={rules!r}: {', '.join(map(repr, unmatched))} matches no layer of a "
        f"ResNet-{config.model.depth} (a regular expression matched against the whole path of "
        f"each of {paths[0]}, {paths[1]}, ..., {paths[-2]}, {paths[-1]}), e.g. "
        "'layer3.*=w8a8' for the last stage.")
  return specs


def _quantization(config) -> None:
  for w, a in bit_pairs(config):
    for value in (w, a):
      if value not in quant.VALID_BITS:
        _fail("bits", config.bits, f"w<W>a<A> with W, A in {list(quant.VALID_BITS)}")
  for protocol in split_names(config.protocol):
    if protocol not in quant.PROTOCOLS:
      _fail("protocol", config.protocol, f"one of {list(quant.PROTOCOLS)} (comma-separated)")
  quant_specs(config)
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


def zeroq(config) -> None:
  common(config, splits=())
  for field in ("batch_size", "iterations", "learning_rate", "plateau_patience",
                "plateau_factor", "min_learning_rate", "num_batches", "concurrent_batches"):
    positive(config, field)
  positive(config, "plateau_threshold", allow_zero=True)
  one_of(config, "init", ("gaussian", "code"))
  if config.num_batches % config.concurrent_batches:
    raise ConfigError(
        f"config.num_batches={config.num_batches} is not a multiple of "
        f"config.concurrent_batches={config.concurrent_batches}; make it one, e.g. "
        f"--config.concurrent_batches={config.num_batches}.")


def gdfq(config) -> None:
  common(config, splits=())
  divisible_batch(config, "batch_size")
  for field in ("warmup_steps", "latent_dim", "learning_rate", "b1", "b2", "temperature"):
    positive(config, field)
  for field in ("lambda_bns", "alpha"):
    positive(config, field, allow_zero=True)
  generator_width(config, "width")
  one_of(config, "kd_reduction", baselines.KD_REDUCTIONS)
  one_of(config, "lr_milestones_of", gdfq_stage.MILESTONES_OF)


def export(config) -> None:
  common(config, splits=())
  student = config.student
  if not isinstance(student, str) or not student or student.startswith(".") or (
      os.sep in student) or student == integer.EXPORT_DIR:
    raise ConfigError(
        f"config.student={student!r} is invalid; allowed: the name of a quantized model's "
        "folder in --workdir, e.g. student_w4a4 or ptq_w4a4_ft_dfqf.")
  if config.bits:
    pairs = bit_pairs(config)
    if len(pairs) != 1 or any(b not in quant.VALID_BITS[:-1] for b in pairs[0]):
      _fail("bits", config.bits, "'' (the checkpoint's) or one w<W>a<A> with W, A in "
            f"{list(quant.VALID_BITS[:-1])}")


def pipeline(config, stage_checks) -> None:
  """The pipeline's own fields, then each stage's config as the pipeline splits it:
  `stage_checks()` = (check, stage config) pairs (split once the own fields are valid)."""
  common(config, splits=("test",))  # each stage checks the splits it reads
  one_of(config, "images", IMAGES)
  if not split_names(config.bits):
    raise ConfigError(f"config.bits={config.bits!r} names no student to fine-tune; "
                      "give one or more of w<W>a<A>, e.g. --config.bits=w4a4.")
  for check, sub in stage_checks():
    check(sub)
