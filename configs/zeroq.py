"""ZeroQ's distilled data (Cai et al., CVPR 2020): images optimized from noise until the
teacher's BN inputs have its running statistics. Arg: 'reference' (default), 'budget' or
'smoke'. Every setting's source: docs/fidelity_zeroq_gdfq.md.

python main.py --config=configs/zeroq.py:budget --workdir=DIR --config.data.dir=../shared/data
Needs DIR/teacher; writes DIR/zeroq (the images, their Adam states and the BN-loss curve).
"""
from configs.common import base_config


def get_config(schedule: str = "reference"):
  config = base_config("zeroq")
  config.teacher_dir = ""  # default: DIR/teacher
  # ZeroQ's batch (uniform_test.py --batch_size 32), each optimized on its own for
  # `iterations` Adam steps with a ReduceLROnPlateau schedule (distill_data.py).
  config.batch_size = 32
  config.iterations = 500
  config.learning_rate = 0.5
  config.plateau_patience = 100
  config.plateau_factor = 0.1
  config.plateau_threshold = 1e-4  # relative (PyTorch's default threshold mode)
  config.min_learning_rate = 1e-4
  config.input_statistics = True  # the images' own mean 0 / std 1 term
  # 'gaussian': N(0, 1), the paper's initialization; 'code': the public code's
  # (randint(0, 255) - 127.5) / 5418.75 (it divides by the variance, not the std).
  config.init = "gaussian"
  # How many images (num_batches x batch_size). ZeroQ distills one batch to calibrate; the
  # student's fine-tuning draws from this set (1,280 = the pipeline's 10 x 128 calibration
  # images).
  config.num_batches = 40
  # Batches optimized at once: each keeps its own optimizer and schedule, so only speed
  # and memory depend on it (num_batches must be a multiple of it).
  config.concurrent_batches = 40
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  if schedule == "reference":
    config.num_batches = 320  # 10,240 images
    config.concurrent_batches = 64
  elif schedule == "smoke":
    config.batch_size = 8
    config.iterations = 4
    config.num_batches, config.concurrent_batches = 4, 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
  elif schedule != "budget":
    raise ValueError(f"configs/zeroq.py:{schedule} is unknown; use reference, budget or smoke.")
  return config
