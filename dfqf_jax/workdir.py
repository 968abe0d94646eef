"""The workdir: checked before any write, and held by one run at a time.

A run takes `DIR/.dfqf.lock` (host, pid, its start time, the command) with an exclusive
create before it writes anything else, refreshes the file's modification time every
HEARTBEAT_SECONDS while it runs, and removes it on exit. A second run finds the lock and
stops with one line naming the holder. A lock is stale, and is taken over, when its holder
is on this host and no longer running (SIGKILL, OOM), or when its heartbeat is older than
STALE_AFTER_SECONDS (a holder on another host that vanished, e.g. a preempted TPU VM). Taking
over renames the stale file first, so of two runs that find the same stale lock only one
wins. In a multi-process job, process 0 takes the lock for the job.
"""
import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import time

from dfqf_jax.errors import UserError

LOCK_FILE = ".dfqf.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


class WorkdirError(UserError):
  """The workdir cannot be used: not a folder, not writable, or held by another run."""


def check(workdir: str) -> None:
  """The workdir is a writable folder, or can be created. Writability is tried with a
  temporary file, removed at once, so nothing is left behind."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir!r} is a file; give a folder (new or existing).")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing!r} is a file")
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".dfqf-write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    what = "is not writable" if existing == path else "cannot be created"
    raise WorkdirError(f"--workdir={workdir!r} {what} ({e.strerror or e}); choose a folder "
                       "you can write to.") from None


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a reused pid apart), where /proc has it."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _running_here(holder: dict) -> bool:
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  recorded = holder.get("process_start")
  return recorded is None or _process_start(pid) in (None, recorded)


def _is_stale(holder: dict, lock_mtime: float) -> bool:
  if holder.get("host") == socket.gethostname():
    return not _running_here(holder)
  return time.time() - lock_mtime > STALE_AFTER_SECONDS


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r} (started "
          f"{holder.get('started')}: {holder.get('command')})")


class Lock:
  """Context manager holding DIR/.dfqf.lock for this process."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "process_start": _process_start(os.getpid()),
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "command": " ".join(["main.py", *sys.argv[1:]])}
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self.me, f)
      self._heartbeat = threading.Thread(target=self._beat, daemon=True)
      self._heartbeat.start()
      return self
    raise WorkdirError(f"could not take {self.path!r}; another run keeps taking it.")

  def _take_over_if_stale(self) -> None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
      mtime = os.path.getmtime(self.path)
    except FileNotFoundError:
      return  # released meanwhile: try again
    except (OSError, ValueError):
      holder, mtime = {}, 0.0  # unreadable: left by a run killed while writing it
    if not _is_stale(holder, mtime):
      raise WorkdirError(
          f"{os.path.dirname(self.path)!r} is in use by {_describe(holder)}; wait for it to "
          f"finish or use another --workdir (if that run is gone for good, delete {self.path}).")
    aside = f"{self.path}.stale.{os.getpid()}"
    try:
      os.rename(self.path, aside)  # of two runs taking over, one rename succeeds
    except FileNotFoundError:
      return
    os.remove(aside)
    print(f"workdir: took over the stale lock of {_describe(holder)}", file=sys.stderr)

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self.path)
      except OSError:
        return

  def __exit__(self, *exc):
    self._stop.set()
    try:
      with open(self.path) as f:
        mine = json.load(f).get("pid") == self.me["pid"]
      if mine:
        os.remove(self.path)
    except (OSError, ValueError):
      pass
