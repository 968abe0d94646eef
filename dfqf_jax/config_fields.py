"""The config fields that the pipeline and its stages divide between them, in one place:
configs/pipeline.py removes them from the stage configs it nests, and the pipeline stage
(dfqf_jax/stages/pipeline.py) sets them on each stage's config when it runs."""

# Set once, on the pipeline, for every stage. configs/pipeline.py removes them from the stage
# configs, so that --config.<stage>_stage.seed=3 is an unknown field (one error line) rather
# than a value silently replaced by the pipeline's.
PIPELINE_FIELDS = ("seed", "data.name", "data.dir", "data.tfds", "data.validation_size",
                   "model.depth", "compute_dtype")

# Fine-tuning's adversarial-generator settings -> the stage-1 config field each one is (its
# loss weights and learning rate). Unset in fine-tuning, those the generator was trained with
# (stages/finetune.with_generator_loss_weights); the pipeline sets them from its generator
# stage's config (the one a rerun of the pipeline would train the generator with).
ADVERSARIAL_FIELDS = {"lambda_is": "lambda_is", "lambda_bn": "lambda_bn",
                      "lambda_adv": "lambda_adv",
                      "generator_learning_rate": "generator.learning_rate"}

# Fields of every job config that the pipeline itself does not use (each stage has its own).
STAGE_ONLY_FIELDS = ("log_every_steps", "checkpoint_every_steps", "on_stale_upstream")


def split_path(field: str) -> tuple[list[str], str]:
  """'data.dir' -> (['data'], 'dir')."""
  *parents, leaf = field.split(".")
  return parents, leaf


def remove_fields(config, fields) -> None:
  """Deletes `fields` (dotted names) from `config`."""
  for field in fields:
    parents, leaf = split_path(field)
    node = config
    for parent in parents:
      node = node[parent]
    del node[leaf]
