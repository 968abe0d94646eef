"""The workdir: checked before any write, and held by one run at a time.

A run takes `DIR/.dfqf.lock` (host, pid, its start time, the command) with an exclusive
create before it writes anything else, refreshes the file's modification time every
HEARTBEAT_SECONDS while it runs, and removes it on exit. A second run finds the lock and
stops with one line naming the holder. A lock is stale, and is taken over, when its holder
is on this host and no longer running (SIGKILL, OOM), or when its heartbeat is older than
STALE_AFTER_SECONDS (a holder on another host that vanished, e.g. a preempted TPU VM). Taking
over renames the stale file first, so of two runs that find the same stale lock only one
wins. In a multi-process job, process 0 takes the lock for the job.

Cloud Storage (gs://) has neither exclusive creation nor renames through our path layer: there
a run writes the lock, reads it back and keeps going only if it reads its own (of two runs
starting within the same instant, the one whose write landed last proceeds), and the
heartbeat rewrites the lock.
"""
import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import time

from dfqf_jax import storage
from dfqf_jax.errors import UserError, brief

LOCK_FILE = ".dfqf.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0


class WorkdirError(UserError):
  """The workdir cannot be used: not a folder, not writable, or held by another run."""


def check(workdir: str) -> None:
  """The workdir is a writable folder, or can be created. Writability is tried with a
  temporary file, removed at once, so nothing is left behind."""
  path = storage.absolute(workdir)
  if storage.is_remote(path):
    return _check_remote(workdir)
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


def _check_remote(workdir: str) -> None:
  """A remote workdir is writable if an object can be written in it (and removed). Any
  failure on the way (no network, no credentials, no bucket) is one WorkdirError."""
  probe = os.path.join(workdir, f".dfqf-write-test-{socket.gethostname()}-{os.getpid()}")
  try:
    storage.check_reachable(workdir)
    is_object = storage.isfile(workdir)
    if not is_object:
      storage.write_atomically(probe, b"")
      storage.remove(probe)
  except Exception as e:  # gcsfs raises FileNotFoundError, OSError, HttpError, auth errors
    bucket = workdir.split("://", 1)[1].split("/", 1)[0]
    raise WorkdirError(f"--workdir={workdir!r} cannot be written ({brief(e)}); check the "
                       "network, your credentials (gcloud auth application-default login), "
                       f"that the bucket {bucket!r} exists (gcloud storage buckets create) and "
                       "that you may write to it.") from None
  if is_object:
    raise WorkdirError(f"--workdir={workdir!r} is an object; give a folder (new or existing).")


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
    self.path = os.path.join(storage.absolute(workdir), LOCK_FILE)
    self.remote = storage.is_remote(self.path)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "process_start": _process_start(os.getpid()),
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "command": " ".join(["main.py", *sys.argv[1:]])}
    self._stop = threading.Event()
    self._heartbeat = None

  def __enter__(self):
    storage.makedirs(os.path.dirname(self.path))
    for _ in range(3):
      try:
        self._create()
      except FileExistsError:
        self._take_over_if_stale()
        continue
      self._heartbeat = threading.Thread(target=self._beat, daemon=True)
      self._heartbeat.start()
      return self
    raise WorkdirError(f"could not take {self.path!r}; another run keeps taking it.")

  def _create(self) -> None:
    """Writes the lock if there is none (FileExistsError if there is)."""
    if self.remote:
      if storage.exists(self.path):
        raise FileExistsError(self.path)
      storage.write_atomically(self.path, json.dumps(self.me))
      if json.loads(storage.read_text(self.path)) != self.me:
        raise FileExistsError(self.path)  # another run wrote after us: it holds the lock
      return
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      json.dump(self.me, f)

  def _take_over_if_stale(self) -> None:
    try:
      holder = json.loads(storage.read_text(self.path))
      mtime = storage.getmtime(self.path)
    except FileNotFoundError:
      return  # released meanwhile: try again
    except (OSError, ValueError):
      holder, mtime = {}, 0.0  # unreadable: left by a run killed while writing it
    if not _is_stale(holder, mtime):
      raise WorkdirError(
          f"{os.path.dirname(self.path)!r} is in use by {_describe(holder)}; wait for it to "
          f"finish or use another --workdir (if that run is gone for good, delete {self.path}).")
    try:
      if self.remote:
        storage.remove(self.path)
      else:
        aside = f"{self.path}.stale.{os.getpid()}"
        os.rename(self.path, aside)  # of two runs taking over, one rename succeeds
        os.remove(aside)
    except FileNotFoundError:
      return
    print(f"workdir: took over the stale lock of {_describe(holder)}", file=sys.stderr)

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if self.remote:
          storage.write_atomically(self.path, json.dumps(self.me))
        else:
          os.utime(self.path)
      except OSError:
        return

  def __exit__(self, *exc):
    self._stop.set()
    try:
      if json.loads(storage.read_text(self.path)) == self.me:
        storage.remove(self.path)
    except (OSError, ValueError):
      pass
