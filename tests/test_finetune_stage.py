"""Stage 2's state: the generator is carried only as far as the fine-tuning needs it."""
import json

import jax
import numpy as np

from cli import run_in_process
from conftest import copy_workdir
from dfqf_jax import checkpoints


def test_real_data_qat_keeps_no_generator_and_kd_on_generated_images_no_generator_optimizer(
    tmp_path, small_data, generator_workdir):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")
  for source, stage in (("real", "qat_real_w4a4"), ("generated", "student_w4a4")):
    result = run_in_process("configs/finetune.py:w4a4,smoke", workdir,
                            f"--config.data.dir={small_data}",
                            f"--config.data_source={source}")
    assert result.returncode == 0, result.stderr[-3000:]
    state, _, step = checkpoints.load_product(str(workdir / stage), stage)
    assert step == 2
    # Without adversarial_generator the generator never trains: no optimizer state for it
    # (and with real images, no generator at all).
    assert not jax.tree.leaves(state.get("g_opt_state", {}))
    assert bool(jax.tree.leaves(state.get("generator", {}))) == (source == "generated")
    with open(workdir / stage / "metrics.jsonl") as f:
      losses = [json.loads(line)["loss_kd"] for line in f if "loss_kd" in line]
    assert losses and np.all(np.isfinite(losses))
