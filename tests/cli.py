"""Runs main.py in a subprocess, as a user would."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(config: str, workdir, *overrides: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "main.py"), f"--config={config}",
          f"--workdir={workdir}", *overrides]


def environment(devices: int = 1) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_main(config: str, workdir, *overrides: str, devices: int = 1,
             timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config, workdir, *overrides), cwd=REPO,
                        env=environment(devices), capture_output=True, text=True,
                        timeout=timeout)
