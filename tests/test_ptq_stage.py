"""The PTQ stage's bookkeeping: the models' wall times add up to the stage's."""
import os
import time

import configs.ptq
from conftest import copy_workdir
from dfqf_jax import training
from dfqf_jax.stages import ptq


def test_the_shared_calibration_work_is_counted_once_across_the_models(tmp_path,
                                                                         generator_workdir):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")
  config = configs.ptq.get_config("w4a4,smoke")
  config.protocol = "dfqf,standard"  # 2 rules x 2 protocols: 4 models from one summary
  started = time.time()
  ptq.run(config, str(workdir), evaluate_after=False)
  elapsed = time.time() - started
  built = [f for f in os.listdir(workdir) if f.startswith("ptq_")]
  assert len(built) == 4
  seconds = [training.read_wall_time(str(workdir / name)) for name in built]
  # Each model carries its own calibration plus a quarter of the shared work (loading the
  # generator, the calibration images, the summaries); counting the shared work in full for
  # each model would add it up four times, well past the stage's wall time.
  assert sum(seconds) <= elapsed
  assert min(seconds) > 0
