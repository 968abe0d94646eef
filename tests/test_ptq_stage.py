"""The PTQ stage's bookkeeping: the models' wall times add up to the stage's."""
import os
import time

import configs.ptq
from conftest import SMALL_TEACHER_DEPTH, copy_workdir
from dfqf_jax import training
from dfqf_jax.stages import ptq


def test_the_shared_calibration_work_is_counted_once_across_the_models(tmp_path,
                                                                         generator_workdir):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")
  config = configs.ptq.get_config("w4a4,smoke")
  config.protocol = "dfqf,standard"  # 2 rules x 2 protocols: 4 models from one summary
  config.model.depth = SMALL_TEACHER_DEPTH
  started = time.time()
  ptq.run(config, str(workdir))
  elapsed = time.time() - started
  built = [f for f in os.listdir(workdir) if f.startswith("ptq_")]
  assert len(built) == 4
  seconds = [training.read_wall_time(str(workdir / name)) for name in built]
  # Each model carries its own calibration plus a quarter of the shared work (loading the
  # teacher and generator, the calibration images, the summaries): together the stage's wall
  # time. Counting the shared work in full for each model would add it up four times.
  # add_wall_time keeps 0.1 s: four roundings of up to 0.05 s each
  assert elapsed - 0.2 <= sum(seconds) <= elapsed + 0.2
  assert min(seconds) > 0

  # A rerun that asks for two more models shares its work between those two only.
  config.calibration = "max,ft,mse"
  started = time.time()
  ptq.run(config, str(workdir))
  elapsed = time.time() - started
  new = ["ptq_w4a4_mse_dfqf", "ptq_w4a4_mse_standard"]
  assert sorted(f for f in os.listdir(workdir) if f.startswith("ptq_")) == sorted(built + new)
  assert [training.read_wall_time(str(workdir / name)) for name in built] == seconds
  assert elapsed - 0.1 <= sum(training.read_wall_time(str(workdir / n)) for n in new) <= (
      elapsed + 0.1)
