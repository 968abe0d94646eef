"""Where a result came from: the commit and the host CPU. No JAX import, so that the
PyTorch benchmark processes can use it too."""
import datetime
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state() -> tuple[str, bool | None]:
  """(HEAD, whether tracked files differ from it).

  $DFQF_COMMIT, when set, names the tree's commit: a copy of the working tree on a remote
  accelerator may carry no .git, or a .git that is not the tree's (one such copy reported the
  previous commit, to which the tree's new files were untracked). When git's HEAD is another
  commit, $DFQF_COMMIT is returned with the dirty flag None (not known). Without either:
  'unknown'.
  """
  named = os.environ.get("DFQF_COMMIT", "")
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return named or "unknown", None
  if named and named != head:
    return named, None
  return head, bool(status.strip())


def commit() -> str:
  """HEAD (git_state), with '+dirty' when tracked files differ from it: a record's commit."""
  head, dirty = git_state()
  return head + ("+dirty" if dirty else "")


def command_line() -> str:
  """This process's command as a record states it: python and its arguments, after the
  XLA and JAX platform settings it ran under."""
  settings = [f"{k}={os.environ[k]}" for k in ("XLA_FLAGS", "JAX_PLATFORMS") if os.environ.get(k)]
  return " ".join(settings + ["python"] + sys.argv)


def utc_date() -> str:
  """Now in UTC, to the second (ISO 8601): a record's date."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def append_row(path: str, row: dict, tag: str) -> dict:
  """Prints `row` with where it came from (commit, CPU, tag, date) and appends it to the
  JSON-lines file `path`; returns it."""
  head, dirty = git_state()
  row = {**row, "commit": head, "dirty": dirty, "cpu_model": cpu_model(),
         "cpu_count": os.cpu_count(), "tag": tag,
         "date": utc_date()}
  print(json.dumps(row))
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
  return row
