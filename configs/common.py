"""Fields shared by every job's config."""
import ml_collections


def base_config(stage: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.seed = 0
  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  # Folder with {name}_train.npz / {name}_test.npz; empty -> the download cache
  # $DFQF_DATA_DIR (default ~/.cache/dfqf_jax), filled on first use; "tfds" -> the prepared
  # TFDS dataset of data.tfds, read without TensorFlow (dfqf_jax/data.py).
  config.data.dir = ""
  config.data.tfds = ml_collections.ConfigDict()
  config.data.tfds.dataset = ""  # TFDS name ("cifar10", "cifar100:3.0.2"); "" = data.name
  config.data.tfds.data_dir = ""  # TFDS data dir, local or gs://; "" = ~/tensorflow_datasets
  # Training images held out for validation (model selection never uses the test split).
  config.data.validation_size = 0
  config.model = ml_collections.ConfigDict()
  config.model.depth = 20
  # "bfloat16": mixed precision for the training steps (bfloat16 convolutions and matmuls;
  # float32 parameters, BN statistics, losses and optimizer states). Evaluation stays float32.
  config.compute_dtype = "float32"
  # A checkpoint built from other upstream checkpoints (teacher, generator) than the workdir
  # now holds: "stop" with the fix, or "rebuild" it (the pipeline's setting).
  config.on_stale_upstream = "stop"
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  # If set, the finished job appends a run record (command, commit, hardware, wall time,
  # results.json, curves) to this JSON path, e.g. experiments/teacher_from_scratch/teacher_cpu.json.
  config.record_to = ""
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator = ""
  config.distributed.num_processes = 1  # 0: detect the cluster (Cloud TPU pod slices)
  config.distributed.process_id = 0
  return config


def bits_and_scale(arg: str, default_bits: str) -> tuple[str, bool]:
  """A config file argument of comma-separated bit widths and/or 'smoke', e.g. 'w4a4',
  'smoke' or 'w8a8,w4a4,smoke' -> ('w8a8,w4a4', True)."""
  words = [w.strip() for w in str(arg).split(",") if w.strip()]
  bits = [w for w in words if w != "smoke"]
  return ",".join(bits) or default_bits, "smoke" in words
