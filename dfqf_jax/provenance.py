"""Where a result came from: the commit and the host CPU. No JAX import, so that the
PyTorch benchmark processes can use it too."""
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state() -> tuple[str, bool | None]:
  """(HEAD, whether tracked files differ from it).

  Outside git (e.g. a copy of the working tree on a remote accelerator) HEAD is taken from
  $DFQF_COMMIT, else 'unknown'; the dirty flag is then None (not known).
  """
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return head, bool(status.strip())
  except (OSError, subprocess.CalledProcessError):
    return os.environ.get("DFQF_COMMIT", "unknown"), None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
