"""The whole DFQF pipeline. Arg: 'smoke' | 'budget' | 'reference' (default) |
'reference_frozen_bn'.

python main.py --config=configs/pipeline.py:budget --workdir=DIR --config.data.dir=../shared/data \
    --config.teacher_weights=../shared/data/resnet20-12fca82f_weights.npz
Without teacher_weights the teacher is trained first. Each stage's settings live in
config.<stage>_stage (the stage's own config file), e.g. --config.finetune_stage.num_epochs=5.

smoke:     every stage in about a minute on a 2-core CPU (used by the tests).
budget:    the 2-core CPU recipe (stage wall times of its last run:
           experiments/budget_resnet20/budget_cpu.json); its settings were chosen on a
           validation split of the training data, never the test set.
reference: the full METHOD.md schedule (hours on an accelerator).
reference_frozen_bn: the reference schedule with the budget recipe's fine-tuning deviation,
           chosen beforehand on held-out training images (never the test set): the students'
           BNs frozen at the teacher's statistics. Stage 1 keeps the reference lambda_bn 0.1
           (the budget's lambda_bn 10 compensates for its 1/40 of the images; the reference
           stage 1 needs no such change).

seed, data.name, data.dir, data.validation_size, model.depth and compute_dtype are set on
the pipeline (--config.seed=3) and apply to every stage; the stage configs do not have them.
Logging and checkpoint cadence, normalization and augmentation are per stage
(--config.generator_stage.log_every_steps=10). Fine-tuning's adversarial-generator loss
weights and learning rate are the generator stage's (--config.generator_stage.lambda_bn=...).
"""
from configs import finetune, gdfq, generator, import_teacher, ptq, teacher, zeroq
from configs.common import base_config
from dfqf_jax.config_fields import (ADVERSARIAL_FIELDS, PIPELINE_FIELDS, STAGE_ONLY_FIELDS,
                                    remove_fields)


SCHEDULES = ("smoke", "budget", "reference", "reference_frozen_bn")


def get_config(schedule: str = "reference"):
  if schedule not in SCHEDULES:
    raise ValueError(f"configs/pipeline.py:{schedule} is unknown; use one of "
                     f"{', '.join(SCHEDULES)}.")
  config = base_config("pipeline")
  config.schedule = schedule
  config.teacher_weights = ""  # a PyTorch state dict .npz to import instead of training
  # Students to fine-tune: every bit width (comma-separated) under every protocol of
  # finetune_stage.protocol (e.g. --config.bits=w4a4,w3a3
  # --config.finetune_stage.protocol=dfqf,standard: four students). The PTQ table always
  # includes their bit widths and protocols (each student's starting point).
  config.bits = "w4a4"
  # Per-layer rules of every student and PTQ model (configs/finetune.py), e.g.
  # --config.rules='layer3.*=w8a8' (mixed precision: W4A4 with the last stage at 8 bits).
  config.rules = ""
  # The students' image source: dfqf (stage 1's generator) | zeroq (distilled images,
  # zeroq_stage) | gdfq (GDFQ's conditional generator, gdfq_stage; trained on in fine-tuning).
  # Everything else is the same; only dfqf runs the PTQ table (it calibrates on stage 1's
  # images); each student's metrics.jsonl logs its calibrated start at step 0.
  config.images = "dfqf"
  config.teacher_stage = teacher.get_config("smoke" if schedule == "smoke" else "reference")
  config.import_stage = import_teacher.get_config()
  config.generator_stage = generator.get_config(
      {"smoke": "smoke", "budget": "cpu"}.get(schedule, "reference"))
  sources_schedule = schedule if schedule in ("smoke", "budget") else "reference"
  config.zeroq_stage = zeroq.get_config(sources_schedule)
  config.gdfq_stage = gdfq.get_config(sources_schedule)
  smoke = ",smoke" if schedule == "smoke" else ""
  config.finetune_stage = finetune.get_config("w4a4" + smoke)
  config.ptq_stage = ptq.get_config(("w4a4" if smoke else "w8a8,w6a6,w4a4") + smoke)
  config.ptq_stage.protocol = "dfqf,standard"
  if smoke:
    config.generator_stage.eval_every_epochs = 100
  else:
    config.ptq_stage.calibration = "max,mse,aciq,kl,ft"
  if schedule in ("budget", "reference_frozen_bn"):
    # Chosen on 5,000 training images held out as a validation split (budget runs of 200
    # steps, val top-1 from the 93.3% PTQ start): BNs in training mode 91.3%, lr 1e-4 with
    # BNs in training mode 75.0%, BNs frozen at the teacher's statistics 97.9%.
    config.finetune_stage.student_bn_train = False
  if schedule == "budget":
    config.data.validation_size = 5000
    ft = config.finetune_stage
    ft.steps_per_epoch, ft.num_epochs = 200, 10
    ft.checkpoint_every_steps = 200
  for name in ("teacher_stage", "import_stage", "generator_stage", "zeroq_stage", "gdfq_stage",
               "finetune_stage", "ptq_stage"):
    remove_fields(config[name], PIPELINE_FIELDS + ("on_stale_upstream",))  # always rebuild
  remove_fields(config.finetune_stage, ADVERSARIAL_FIELDS)  # set from generator_stage
  remove_fields(config.finetune_stage, ("images",))  # set from config.images
  for name in ("finetune_stage", "ptq_stage"):
    remove_fields(config[name], ("rules",))  # set from config.rules
  remove_fields(config, STAGE_ONLY_FIELDS)
  return config
