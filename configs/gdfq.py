"""GDFQ (Xu et al., ECCV 2020): a label-conditioned generator trained with the teacher's
cross-entropy against the sampled label plus a BN-statistics loss. This stage is GDFQ's
warm-up (the generator alone); fine-tuning (configs/finetune.py with images='gdfq') trains the
student with GDFQ's KD + CE loss while the generator keeps training, with the settings
recorded here. Arg: 'reference' (default), 'budget' or 'smoke'. Every setting's source:
docs/fidelity_zeroq_gdfq.md.

python main.py --config=configs/gdfq.py:budget --workdir=DIR --config.data.dir=../shared/data
Needs DIR/teacher; writes DIR/gdfq_generator.
"""
from configs.common import base_config


def get_config(schedule: str = "reference"):
  config = base_config("gdfq")
  config.teacher_dir = ""  # default: DIR/teacher
  # GDFQ's batch is 200; ours is fine-tuning's (128), as the generator keeps training there
  # on the student's batches. --config.batch_size=200 with the fine-tuning batch 200 is GDFQ's.
  config.batch_size = 128
  config.warmup_steps = 800  # warmup_epochs 4 x 200 iterations per epoch
  config.latent_dim = 100
  config.width = 128  # the generator's channels (DFQF's generator, as GDFQ's)
  config.reference_quirks = True  # the generator's BN epsilon 0.8 (and DFQF's N(0, 0.02) init)
  config.learning_rate = 0.001  # lr_G, Adam
  config.b1 = 0.5
  config.b2 = 0.999
  # step_G = [100, 200, 300] of 400 epochs, x0.1 each, as fractions of the generator's
  # fine-tuning steps ('finetuning': GDFQ's 4 warm-up epochs are 1% of its run, so its drops
  # fall at 24/49/75% of fine-tuning) or of its whole run ('whole_run': warm-up + fine-tuning,
  # the hocon's literal epochs; the budget's 800 warm-up steps before 2,000 of fine-tuning
  # would put the first drop inside the warm-up).
  config.lr_milestones = (0.25, 0.5, 0.75)
  config.lr_milestones_of = "finetuning"
  config.lambda_bns = 0.1
  # The student's loss in fine-tuning: alpha T^2 KL(t/T || s/T) + CE(s, y).
  config.temperature = 20.0
  config.alpha = 1.0
  config.kd_reduction = "elementwise_mean"  # PyTorch KLDivLoss() as GDFQ calls it | batchmean
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  if schedule == "smoke":
    config.batch_size = 16
    config.warmup_steps = 4
    config.latent_dim = 32
    config.width = 16  # deviation, smoke only
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
  elif schedule not in ("reference", "budget"):
    raise ValueError(f"configs/gdfq.py:{schedule} is unknown; use reference, budget or smoke.")
  return config
