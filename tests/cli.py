"""Runs main.py in a subprocess, as a user would."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test process and main.py subprocess uses these XLA CPU settings (compare runs made
# with the same flags): the older loop emitters instead of the fusion emitters, a third less
# compilation (a smoke stage-1 step 4.4-5.2 s -> 2.5-3.2 s; a cold smoke pipeline 54 -> 42
# CPU seconds) for the same HLO, only its machine code generated otherwise; and Eigen's
# convolutions and matmuls on the calling thread: the suite runs one test process per core,
# and each one splitting its tiny convolutions over every core only made them wait for each
# other (test_resume.py and test_parallel.py on 2 workers: 115-136 s -> 101-106 s wall).
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false"


def main_command(config: str, workdir, *overrides: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "main.py"), f"--config={config}",
          f"--workdir={workdir}", *overrides]


def environment(devices: int = 1) -> dict:
  """The environment of a main.py subprocess: `devices` CPU devices, and XLA's CPU backend
  without LLVM optimization: a smoke run is mostly compilation (a cold stage-1 smoke run
  40 s -> 23 s; the random initializers alone compile for 13 s at the default level), and
  the code is only slower (its float rounding may differ in the last bit, e.g. where LLVM
  would fuse a multiply-add, so compare runs made with the same environment)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      f"--xla_backend_optimization_level=0 {TEST_XLA_FLAGS}")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def environment_of_the_test_process() -> dict:
  """The environment of a main.py subprocess that computes exactly what `run_in_process`
  does in this test process (8 devices, JAX's optimizations mostly off: conftest.py): a run
  interrupted in a subprocess then resumes bit-identically in this process."""
  return {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def run_main(config: str, workdir, *overrides: str, devices: int = 1,
             timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config, workdir, *overrides), cwd=REPO,
                        env=environment(devices), capture_output=True, text=True,
                        timeout=timeout)


def run_in_process(config: str, workdir, *overrides: str) -> subprocess.CompletedProcess:
  """main.py's command line run in this (8-device) test process: for tests of what a run
  says and writes, where a new process would only add its start-up and compilation.

  Returns what `run_main` does: the exit code and everything printed to stdout/stderr.
  """
  import contextlib
  import io

  from absl import flags  # noqa: PLC0415

  import main  # noqa: PLC0415
  argv = main_command(config, workdir, *overrides)[1:]
  flag_values = flags.FlagValues()
  main.define_flags(flag_values, argv)
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    try:
      main.parse_flags(argv, flag_values)
      main.run(flag_values.config, flag_values.workdir)
      code = 0
    except SystemExit as exit_:
      code = exit_.code if isinstance(exit_.code, int) else 1
  return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())
