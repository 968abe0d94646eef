"""Every file the project reads or writes, on a local disk or in Cloud Storage (gs://...).

Paths stay strings (os.path.join, dirname and basename work on both kinds); whatever touches
storage goes through this module. Local paths use `os` exactly as a local program would;
remote ones use etils.epath (what Orbax uses too), which reaches gs:// through gcsfs.

Cloud Storage has no folders, no appends and no renames: a folder exists once an object lies
under it, a file that grows (metrics.jsonl, TensorBoard events) is rewritten whole at each
flush, and an object write is already atomic (readers see the old object or the new one),
so `write_atomically` writes it directly. Point gcsfs and Orbax's tensorstore at an emulator
with STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL (tests/test_cloud_storage.py does).
"""
import hashlib
import io
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse

from etils import epath

_UMASK = os.umask(0o22)  # read once, at import (setting it is process-wide)
os.umask(_UMASK)


def is_remote(path) -> bool:
  return "://" in str(path)


def absolute(path) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def _remote(path) -> epath.Path:
  """epath's Path for a remote path, gcsfs's listing cache dropped first: gcsfs keeps
  listings for the life of the process, and objects written by tensorstore (Orbax's arrays)
  or by another process never enter that cache."""
  p = epath.Path(path)
  filesystem = getattr(p._backend, "fs", None)  # pylint: disable=protected-access
  if filesystem is not None:  # (absent when TensorFlow's gfile serves gs://)
    filesystem(str(p)).invalidate_cache()
  return p


REACH_TIMEOUT_SECONDS = 10.0


def check_reachable(path) -> None:
  """Raises OSError unless the Cloud Storage endpoint that `path` is served from accepts a
  connection within REACH_TIMEOUT_SECONDS: gcsfs retries a refused or unresolved connection
  for about a minute before it raises."""
  url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
  parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
  address = (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
  outcome = []

  def connect():
    try:
      socket.create_connection(address, timeout=REACH_TIMEOUT_SECONDS).close()
      outcome.append(None)
    except OSError as e:
      outcome.append(e)

  thread = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout
  thread.start()
  thread.join(REACH_TIMEOUT_SECONDS)
  if not outcome:
    raise TimeoutError(f"no answer from {address[0]}:{address[1]} within "
                       f"{REACH_TIMEOUT_SECONDS:.0f} s")
  if outcome[0] is not None:
    raise OSError(f"cannot connect to {address[0]}:{address[1]} ({outcome[0]})")


def exists(path) -> bool:
  return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return _remote(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path) -> list[str]:
  """The names in folder `path`, sorted."""
  if is_remote(path):
    return sorted(p.name for p in _remote(path).iterdir())
  return sorted(os.listdir(path))


def makedirs(path) -> None:
  if not is_remote(path):  # remote folders exist once something is written under them
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  if is_remote(path):
    epath.Path(path).unlink()
  else:
    os.remove(path)


def rmtree(path) -> None:
  if is_remote(path):
    epath.Path(path).rmtree()
  else:
    shutil.rmtree(path)


def getmtime(path) -> float:
  return float(_remote(path).stat().mtime) if is_remote(path) else os.path.getmtime(path)


def getsize(path) -> int:
  return int(epath.Path(path).stat().length) if is_remote(path) else os.path.getsize(path)


def folder_signature(path) -> str:
  """A short hash of the name, size and modification time of every file under folder
  `path`: it changes when any file is rewritten, truncated, added or removed (what a
  result computed from the folder's contents must be recomputed after)."""
  if is_remote(path):  # (gcsfs refuses recursive globs: walked folder by folder)
    root, folders, rows = _remote(path), [_remote(path)], []
    while folders:
      for entry in folders.pop().iterdir():
        if entry.is_dir():
          folders.append(entry)
        else:
          stat = entry.stat()
          rows.append(f"{entry.relative_to(root)}:{stat.length}:{stat.mtime}")
    rows.sort()
  else:
    rows = []
    for folder, _, names in os.walk(path):
      for name in names:
        stat = os.stat(os.path.join(folder, name))
        rows.append(f"{os.path.relpath(os.path.join(folder, name), path)}:{stat.st_size}:"
                    f"{stat.st_mtime_ns}")
    rows.sort()
  return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def open_file(path, mode: str = "r"):
  """A file object for reading (or writing a whole file)."""
  return epath.Path(path).open(mode) if is_remote(path) else open(path, mode)


def read_text(path) -> str:
  with open_file(path) as f:
    return f.read()


def read_bytes(path) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_atomically(path, content: str | bytes) -> None:
  """Writes `content` so that a reader never sees a partial file (locally: a temporary file
  beside `path`, then a rename)."""
  if is_remote(path):
    epath.Path(path).write_bytes(content if isinstance(content, bytes) else content.encode())
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
  try:
    os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp's file is private)
    with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
      f.write(content)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def copyfile(source, destination) -> None:
  write_atomically(destination, read_bytes(source))


def save_figure(save, path) -> None:
  """Calls save(file object) (PIL's or matplotlib's save) and writes the bytes to `path`."""
  buffer = io.BytesIO()
  save(buffer)
  write_atomically(path, buffer.getvalue())


class LineLog:
  """A text file that grows by lines, starting from `lines`: appended to on a local disk;
  in Cloud Storage (no appends) rewritten whole at each write."""

  def __init__(self, path, lines: list[str]):
    self.path, self.lines = path, list(lines)
    write_atomically(path, "".join(self.lines))
    self._file = None if is_remote(path) else open(path, "a")

  def write(self, line: str) -> None:
    if self._file is None:
      self.lines.append(line)
      write_atomically(self.path, "".join(self.lines))
    else:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class _RemoteEventFile:
  """tensorboardX's writer for gs:// event files: the bytes so far, uploaded at each flush."""

  def __init__(self, path):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    write_atomically(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteEventFiles:
  def open(self, path):
    return _RemoteEventFile(path)

  def directory_check(self, path):
    pass


def summary_writer(directory):
  """A tensorboardX SummaryWriter for a local or gs:// folder (its own gs:// support needs
  google-cloud-storage; this one goes through epath like every other file)."""
  from tensorboardX import SummaryWriter, record_writer
  record_writer.register_writer_factory("gs", _RemoteEventFiles())
  return SummaryWriter(directory)
