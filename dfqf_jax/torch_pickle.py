"""Reads a PyTorch `torch.save` file (.th, .pt) without PyTorch, running none of its code.

A restricted unpickler builds only plain values, ordered dicts and tensors (as NumPy arrays);
any other class named in the file is refused. Two layouts exist:
- legacy (PyTorch < 1.6, e.g. akamaster's pretrained CIFAR ResNets): pickles of the magic
  number, the protocol, sys_info, the object, the storage keys; then each storage as an int64
  element count followed by its raw little-endian bytes;
- zip (PyTorch >= 1.6): `<archive>/data.pkl` is the object and `<archive>/data/<key>` each
  storage's raw bytes.
In both, the object pickle names storages by persistent id ('storage', <type>, key, location,
numel[, view]) and rebuilds tensors with torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...).
"""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from dfqf_jax.errors import UserError

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_}


class TorchFileError(UserError, ValueError):
  """A file that is not a readable torch.save file of tensors."""


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.flat = dtype, numel, None


class _Tensor:
  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), stride

  def array(self) -> np.ndarray:
    flat = self.storage.flat
    itemsize = flat.dtype.itemsize
    if self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) >= len(flat) > 0:
      raise TorchFileError("a tensor reaches past the end of its storage")
    return np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.size, [s * itemsize for s in self.stride]).copy()


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, storages: dict):
    super().__init__(file, encoding="utf-8")
    self.storages = storages

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _Tensor
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"it names {module}.{name}, which a file of tensors does "
                                 "not need (refused: unpickling it could run code)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)) or (len(pid) > 5 and pid[5] is not None):
      raise pickle.UnpicklingError(f"unsupported storage reference {pid!r:.80}")
    key = str(pid[2])
    if key not in self.storages:
      self.storages[key] = _Storage(pid[1].dtype, int(pid[4]))
    return self.storages[key]


def _fill(storage: _Storage, raw: bytes, where: str) -> None:
  need = storage.numel * storage.dtype.itemsize
  if len(raw) < need:
    raise TorchFileError(f"{where} holds {len(raw)} bytes, {need} expected (truncated)")
  storage.flat = np.frombuffer(raw[:need], storage.dtype.newbyteorder("<"))


def _load_legacy(raw: bytes) -> object:
  f = io.BytesIO(raw)
  if _Unpickler(f, {}).load() != LEGACY_MAGIC:
    raise TorchFileError("it is neither a zip archive nor a legacy torch.save file")
  _Unpickler(f, {}).load()  # protocol version
  sys_info = _Unpickler(f, {}).load()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise TorchFileError("it was written on a big-endian machine (unsupported)")
  storages = {}
  obj = _Unpickler(f, storages).load()
  for key in _Unpickler(f, {}).load():
    (numel,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
    storage = storages[str(key)]
    _fill(storage, f.read(numel * storage.dtype.itemsize), f"storage {key}")
  return obj


def _load_zip(raw: bytes) -> object:
  with zipfile.ZipFile(io.BytesIO(raw)) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise TorchFileError("the zip archive has no single data.pkl")
    prefix = pickles[0].removesuffix("data.pkl")
    if archive.NameToInfo.get(prefix + "byteorder") and archive.read(
        prefix + "byteorder") != b"little":
      raise TorchFileError("it was written on a big-endian machine (unsupported)")
    storages = {}
    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    for key, storage in storages.items():
      _fill(storage, archive.read(f"{prefix}data/{key}"), f"storage {key}")
  return obj


def _arrays(obj):
  if isinstance(obj, _Tensor):
    return obj.array()
  if isinstance(obj, dict):
    return type(obj)((k, _arrays(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_arrays(v) for v in obj)
  return obj


def load(raw: bytes, where: str) -> object:
  """The object of torch.save file bytes, tensors as NumPy arrays."""
  try:
    return _arrays(_load_zip(raw) if zipfile.is_zipfile(io.BytesIO(raw)) else _load_legacy(raw))
  except TorchFileError as e:
    raise TorchFileError(f"{where} cannot be read as a PyTorch file: {e}.") from None
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError,
          struct.error, zipfile.BadZipFile) as e:
    raise TorchFileError(f"{where} cannot be read as a PyTorch file ({type(e).__name__}: "
                         f"{e}); it is truncated, corrupted or not a file of tensors.") from None


def state_dict(obj, where: str) -> dict:
  """The name -> array mapping of a loaded file: itself, or its 'state_dict' entry (the
  training scripts' {'epoch', 'best_prec1', 'state_dict'})."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not (isinstance(obj, dict) and obj and all(
      isinstance(v, np.ndarray) for v in obj.values())):
    raise TorchFileError(f"{where} holds no state dict (a mapping of names to tensors).")
  return dict(obj)
