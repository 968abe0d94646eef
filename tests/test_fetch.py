"""First-run downloads (fetch.py) against a loopback server, and reading .th files without
PyTorch (torch_pickle.py)."""
import hashlib
import io
import json
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest

import mirror
from cli import run_in_process
from dfqf_jax import convert, data, fetch, torch_pickle

IMAGES_PER_SPLIT = 50


@pytest.fixture(scope="module")
def served(shared_data, tmp_path_factory):
  """(server, folder, listing): small CIFAR archives and the real .th files on 127.0.0.1."""
  folder = str(tmp_path_factory.mktemp("mirror"))
  listing = mirror.build(shared_data, folder, IMAGES_PER_SPLIT)
  with mirror.Server(folder) as server:
    yield server, folder, listing


@pytest.fixture
def cache(served, tmp_path, monkeypatch):
  """An empty $DFQF_DATA_DIR and $DFQF_SOURCES pointing at the loopback server."""
  server, _, listing = served
  sources = tmp_path / "sources.json"
  mirror.write_sources(str(sources), server.url, listing)
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(fetch.SOURCES_ENV, str(sources))
  return tmp_path / "cache"


def files_in(folder) -> list:
  return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_dataset_is_downloaded_once_verified_and_converted(served, cache, shared_data, name):
  server, _, _ = served
  before = len(server.requests)
  test = data.load_split(name, "test", "")
  train = data.load_split(name, "train", "")
  assert len(server.requests) - before == 1  # both splits from one archive, then cached
  assert files_in(cache) == [f"{name}_test.npz", f"{name}_train.npz"]
  expected = mirror._subset(os.path.join(shared_data, "cifar10_test.npz"), IMAGES_PER_SPLIT)
  np.testing.assert_array_equal(test.images, expected["images"])  # planes -> HWC exactly
  labels = expected["labels"] if name == "cifar10" else (
      expected["labels"] * 10 + np.arange(IMAGES_PER_SPLIT) % 10)
  np.testing.assert_array_equal(test.labels, labels)
  assert len(train) == IMAGES_PER_SPLIT and train.images.dtype == np.uint8
  data.load_split(name, "test", "")
  assert len(server.requests) - before == 1


def test_a_given_data_dir_is_never_downloaded_into(served, cache, tmp_path):
  with pytest.raises(data.DataError, match="has no cifar10_test.npz"):
    data.load_split("cifar10", "test", str(tmp_path / "elsewhere"))
  assert files_in(cache) == []


def test_a_pretrained_name_gives_the_published_weights(served, cache, shared_data):
  state_dict, source = convert.load_state_dict("resnet20_cifar10")
  assert source == "resnet20_cifar10"
  expected = np.load(os.path.join(shared_data, "resnet20-12fca82f_weights.npz"))
  assert sorted(state_dict) == sorted(expected.files)
  for key in expected.files:
    np.testing.assert_array_equal(state_dict[key], expected[key])
  assert files_in(cache) == ["resnet20_cifar10.npz"]


def test_the_published_checksums_guard_the_real_sources(monkeypatch, served, tmp_path):
  """Without $DFQF_SOURCES the registry's own URL and checksum are used: the mirror's
  rebuilt CIFAR archive is not the published file, so it is refused."""
  server, _, _ = served
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.delenv(fetch.SOURCES_ENV, raising=False)
  monkeypatch.setitem(fetch.DATASETS, "cifar10", fetch.Source(
      f"{server.url}/{mirror.ARCHIVES['cifar10']}", md5=fetch.DATASETS["cifar10"].md5))
  with pytest.raises(fetch.FetchError, match="not the published c58f3010"):
    data.load_split("cifar10", "test", "")
  assert files_in(tmp_path / "cache") == []


def _replace_source(tmp_path, name, **entry):
  """Changes one entry of the `cache` fixture's $DFQF_SOURCES file."""
  sources = tmp_path / "sources.json"
  table = json.loads(sources.read_text())
  table[name].update(entry)
  sources.write_text(json.dumps(table))


@pytest.mark.parametrize("case,phrase", [
    ("checksum mismatch", "not the published"),
    ("truncated archive", "not a readable cifar10 python archive"),
    ("offline", "Offline? Point --config.data.dir"),
])
def test_a_bad_download_is_one_error_and_leaves_nothing(served, cache, tmp_path, case, phrase):
  _, folder, _ = served
  if case == "checksum mismatch":
    _replace_source(tmp_path, "cifar10", sha256="0" * 64)
  elif case == "truncated archive":
    payload = open(os.path.join(folder, mirror.ARCHIVES["cifar10"]), "rb").read()
    cut = payload[:len(payload) // 2]
    with open(os.path.join(folder, "cut.tar.gz"), "wb") as f:
      f.write(cut)
    _replace_source(tmp_path, "cifar10", url=f"{served[0].url}/cut.tar.gz",
               sha256=hashlib.sha256(cut).hexdigest())
  else:
    _replace_source(tmp_path, "cifar10", url="http://127.0.0.1:9/cifar.tar.gz")
  result = run_in_process("configs/teacher.py:smoke", tmp_path / "workdir")
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(error_lines) == 1, result.stderr[-2000:]
  assert phrase in error_lines[0], error_lines[0]
  assert files_in(cache) == [] and files_in(tmp_path / "workdir") == []


def test_an_unknown_pretrained_name_is_one_error(tmp_path):
  result = run_in_process("configs/import_teacher.py", tmp_path / "workdir",
                          "--config.weights=resnet99_cifar10")
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(error_lines) == 1, result.stderr[-2000:]
  assert "neither a file nor a pretrained name" in error_lines[0]
  assert "resnet20_cifar10" in error_lines[0]
  assert not (tmp_path / "workdir" / "teacher").exists()


# -- torch.save files without PyTorch ----------------------------------------------------------


@pytest.mark.parametrize("stem", ["resnet20-12fca82f", "resnet56-4bfd9763"])
def test_a_legacy_th_file_reads_as_its_published_npz_copy(shared_data, stem):
  """The .npz copies in ../shared/data were extracted by an independent reader."""
  with open(os.path.join(shared_data, f"{stem}.th"), "rb") as f:
    obj = torch_pickle.load(f.read(), stem)
  state_dict = torch_pickle.state_dict(obj, stem)
  expected = np.load(os.path.join(shared_data, f"{stem}_weights.npz"))
  assert sorted(state_dict) == sorted(expected.files)
  for key in expected.files:
    assert state_dict[key].dtype == expected[key].dtype
    np.testing.assert_array_equal(state_dict[key], expected[key])


class _TorchPickler(pickle.Pickler):
  """Writes what torch.save's zip layout holds for float32 tensors: _rebuild_tensor_v2
  calls over storages named by persistent id."""

  def __init__(self, file, storages):
    super().__init__(file, protocol=2)
    self.storages = storages

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ("storage", _GLOBALS["FloatStorage"], obj.key, "cpu", obj.numel)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _TensorRef):
      return (_GLOBALS["_rebuild_tensor_v2"], (obj.storage, obj.offset, obj.size, obj.stride,
                                               False, _GLOBALS["OrderedDict"]()))
    return NotImplemented


class _StorageRef:
  def __init__(self, key, numel):
    self.key, self.numel = key, numel


class _TensorRef:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


@pytest.fixture
def torch_names(monkeypatch):
  """Stand-ins that pickle by reference as torch.FloatStorage and
  torch._utils._rebuild_tensor_v2 (registered in sys.modules for this test only)."""
  import collections
  import types
  names = {"OrderedDict": collections.OrderedDict}
  for module, name in (("torch", "FloatStorage"), ("torch._utils", "_rebuild_tensor_v2")):
    monkeypatch.setitem(sys.modules, module, sys.modules.get(module) if module in sys.modules
                        and hasattr(sys.modules[module], name) else types.ModuleType(module))
    if not hasattr(sys.modules[module], name):
      stand_in = type(name, (), {"__module__": module, "__qualname__": name})
      setattr(sys.modules[module], name, stand_in)
    names[name] = getattr(sys.modules[module], name)
  monkeypatch.setattr(sys.modules[__name__], "_GLOBALS", names)
  return names


_GLOBALS = {}


def test_a_zip_layout_file_with_shared_storage_and_strides(torch_names):
  """Two tensors on one storage (an offset view and a transposed view), as torch.save writes
  them since PyTorch 1.6."""
  flat = np.arange(12, dtype=np.float32)
  storage = _StorageRef("0", 12)
  obj = {"state_dict": __import__("collections").OrderedDict(
      [("a.weight", _TensorRef(storage, 0, (3, 4), (4, 1))),
       ("a.weightT", _TensorRef(storage, 0, (4, 3), (1, 4))),
       ("b.bias", _TensorRef(storage, 8, (4,), (1,)))])}
  pkl = io.BytesIO()
  _TorchPickler(pkl, {}).dump(obj)
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as archive:
    archive.writestr("model/data.pkl", pkl.getvalue())
    archive.writestr("model/byteorder", "little")
    archive.writestr("model/data/0", flat.tobytes())
  state_dict = torch_pickle.state_dict(torch_pickle.load(out.getvalue(), "zip"), "zip")
  np.testing.assert_array_equal(state_dict["a.weight"], flat.reshape(3, 4))
  np.testing.assert_array_equal(state_dict["a.weightT"], flat.reshape(3, 4).T)
  np.testing.assert_array_equal(state_dict["b.bias"], flat[8:])


def test_a_file_naming_other_code_is_refused_unrun():
  class Payload:
    def __reduce__(self):
      return (os.system, ("echo pwned",))
  raw = pickle.dumps(Payload(), protocol=2)
  legacy = b"".join(pickle.dumps(v, protocol=2) for v in (torch_pickle.LEGACY_MAGIC, 1001, {}))
  for blob in (legacy + raw, raw):
    with pytest.raises(torch_pickle.TorchFileError, match="cannot be read as a PyTorch file"):
      torch_pickle.load(blob, "evil.th")


def test_a_truncated_th_file_is_one_clear_error(shared_data):
  with open(os.path.join(shared_data, "resnet20-12fca82f.th"), "rb") as f:
    raw = f.read()
  with pytest.raises(torch_pickle.TorchFileError, match="truncated"):
    torch_pickle.load(raw[:len(raw) - 1000], "cut.th")
