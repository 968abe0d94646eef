"""Tests run on CPU with 8 forced host devices (set before jax is imported)."""
import collections
import contextlib
import fcntl
import json
import os
import resource
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cli import TEST_XLA_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"
                           ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every test process (and every main.py it starts) shares compiled programs: the suite runs
# the same stages many times, and compilation dominates a smoke-scale run. Every program is
# cached, not only those that took over a second to compile (JAX's default): a smoke run
# compiles dozens of small ones.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# In-process tests run tiny programs once: compiling them with XLA's full optimization costs
# more than it saves (as flax's own tests do). Only this process; main.py subprocesses keep it.
jax.config.update("jax_disable_most_optimizations", True)

SHARED_DATA = os.environ.get("DFQF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
TEACHER_WEIGHTS = os.path.join(SHARED_DATA, "resnet20-12fca82f_weights.npz")
PUBLISHED_TOP1 = 91.73  # that teacher's published CIFAR-10 test top-1, % (SOURCES.md)
# A run given no data.dir reads the download cache: the shared files, never the network.
os.environ.setdefault("DFQF_DATA_DIR", SHARED_DATA)


@pytest.fixture
def fully_optimized():
  """XLA's full optimization for the programs this test compiles: for a forward pass over
  thousands of images, where running the program costs more than optimizing it (ResNet-20
  over the 10,000 test images: 29 -> 22 CPU seconds). The flag is not part of JAX's
  in-memory cache key: a program this worker compiled before is reused as it was."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isfile(os.path.join(SHARED_DATA, "cifar10_test.npz")):
    pytest.skip("../shared/data is not present")
  return SHARED_DATA


SMALL_DATA = os.path.join(REPO, ".pytest_cache", "small_data")


def write_small_split(src: str, dst: str, size: int, seed: int = 0) -> None:
  """A random `size`-image subset of a CIFAR .npz split (the shared files are class-major)."""
  import numpy as np
  with np.load(src) as f:
    images, labels = f["images"], f["labels"]
  keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:size])
  tmp = f"{dst}.{os.getpid()}.tmp.npz"  # xdist workers may write it at the same time
  np.savez(tmp, images=images[keep], labels=labels[keep])
  os.replace(tmp, dst)


@pytest.fixture(scope="session")
def small_data(shared_data):
  """SMALL_DATA: 250 test and 1,000 training images of ../shared/data, for runs whose
  numbers do not matter (evaluation dominates a smoke run). 250 is a multiple of neither 4
  nor 8: evaluations over several devices pad and mask their batch."""
  return write_small_data(shared_data, SMALL_DATA)


def write_small_data(source: str, folder: str) -> str:
  """`folder` with the small splits of `source` (see small_data), written if missing."""
  os.makedirs(folder, exist_ok=True)
  for split, size in (("test", 250), ("train", 1000)):
    path = os.path.join(folder, f"cifar10_{split}.npz")
    if not os.path.exists(path):
      write_small_split(os.path.join(source, f"cifar10_{split}.npz"), path, size)
  return folder


def copy_workdir(source, destination):
  """A fresh copy of a prepared workdir (session fixtures are shared: never write to them)."""
  shutil.copytree(source, destination)
  return destination


def pytest_addoption(parser):
  parser.addoption(
      "--cpu-seconds", metavar="JSONL",
      help="write one line per test to JSONL: the CPU seconds of its test process and of the "
           "subprocesses it waited for (unlike --durations, not inflated by the other workers)")


def _cpu_seconds() -> tuple[float, float]:
  """(this process, its waited-for children): user + system CPU seconds."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """--cpu-seconds: where the suite's time goes (its fixtures' setup counts to the first
  test that asks for them)."""
  path = item.config.getoption("--cpu-seconds")
  before, started = _cpu_seconds(), time.time()
  yield
  if path:
    (own, children) = (b - a for a, b in zip(before, _cpu_seconds()))
    with open(path, "a") as f:
      f.write(json.dumps({"test": item.nodeid, "process_s": round(own, 2),
                          "subprocesses_s": round(children, 2),
                          "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                          "started": round(started, 2),
                          "wall_s": round(time.time() - started, 2)}) + "\n")


def _is_xdist_worker(config) -> bool:
  return hasattr(config, "workerinput")


def pytest_configure(config):
  path = config.getoption("--cpu-seconds")
  if path and not _is_xdist_worker(config):
    open(path, "w").close()  # this run's tests only


def pytest_terminal_summary(terminalreporter, config):
  """--cpu-seconds: the 15 test files that took the most CPU seconds, and each worker's busy
  time and end (a worker that ends early idles while the other finishes the suite)."""
  path = config.getoption("--cpu-seconds")
  if not path or _is_xdist_worker(config) or not os.path.exists(path):
    return
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  if not rows:
    return
  per_file = collections.Counter()
  for row in rows:
    per_file[row["test"].split("::")[0]] += row["process_s"] + row["subprocesses_s"]
  terminalreporter.write_sep("=", f"CPU seconds per test file ({sum(per_file.values()):.0f} "
                             f"in all; per test: {path})")
  for name, seconds in per_file.most_common(15):
    terminalreporter.write_line(f"{seconds:8.1f}  {name}")
  first = min(row["started"] for row in rows)
  for worker in sorted({row["worker"] for row in rows}):
    own = [row for row in rows if row["worker"] == worker]
    terminalreporter.write_line(
        f"{worker}: {len(own)} tests, busy {sum(r['wall_s'] for r in own):.0f} s, last test "
        f"ended {max(r['started'] + r['wall_s'] for r in own) - first:.0f} s after the first "
        "began")


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker per usable core, at most 4 (each test process already
  runs its 8 host devices on several threads)."""
  return max(1, min(4, len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def _exclusive(path):
  """Holds an exclusive lock on `path`.lock: one xdist worker at a time inside."""
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def prepared_once(tmp_path_factory, name: str, build) -> str:
  """A workdir made by build(workdir) once per test session, shared by every xdist worker
  (built by the first one to ask, under a lock; the others wait and reuse it)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, common to the workers
  workdir = root / f"prepared_{name}" / "run"
  with _exclusive(root / f"prepared_{name}"):
    if not (workdir.parent / "done").exists():
      if workdir.exists():
        shutil.rmtree(workdir)
      build(workdir)
      (workdir.parent / "done").write_text("")
  return workdir


@pytest.fixture(scope="session")
def imported_workdir(shared_data, tmp_path_factory):
  """A workdir holding the imported 91.73% teacher, made once per session: copy it
  (copy_workdir) before running anything in it."""
  from cli import run_in_process

  def build(workdir):
    result = run_in_process("configs/import_teacher.py", workdir,
                            f"--config.weights={TEACHER_WEIGHTS}")
    assert result.returncode == 0, result.stderr[-2000:]

  return prepared_once(tmp_path_factory, "imported", build)


# The teacher of small_teacher_workdir and the generator workdirs built on it: a ResNet-8
# trained one step from scratch. What a stage does with its teacher (resume, signals, what
# its state holds) does not depend on the depth or on what the teacher knows, and a ResNet-8
# costs a third of a ResNet-20 to trace, compile and run. The stages refuse a model.depth
# other than their teacher's, so every stage run in those workdirs passes SMALL_TEACHER_ARGS.
SMALL_TEACHER_DEPTH = 8
SMALL_TEACHER_ARGS = (f"--config.model.depth={SMALL_TEACHER_DEPTH}",)


@pytest.fixture(scope="session")
def small_teacher_workdir(small_data, tmp_path_factory):
  """A workdir holding the ResNet-8 teacher (SMALL_TEACHER_ARGS), made once per session:
  copy it before running anything in it."""
  from cli import run_in_process

  def build(workdir):
    result = run_in_process("configs/teacher.py:smoke", workdir, *SMALL_TEACHER_ARGS,
                            "--config.num_steps=1", f"--config.data.dir={small_data}")
    assert result.returncode == 0, result.stderr[-2000:]

  return prepared_once(tmp_path_factory, "small_teacher", build)


@pytest.fixture(scope="session")
def generator_workdir(small_teacher_workdir, small_data, tmp_path_factory):
  """small_teacher_workdir plus the smoke stage-1 generator (4 iterations), made once per
  session: copy it before running anything in it (with SMALL_TEACHER_ARGS)."""
  from cli import run_in_process

  def build(workdir):
    copy_workdir(small_teacher_workdir, workdir)
    result = run_in_process("configs/generator.py:smoke", workdir, *SMALL_TEACHER_ARGS,
                            f"--config.data.dir={small_data}", "--config.eval_every_epochs=100")
    assert result.returncode == 0, result.stderr[-2000:]

  return prepared_once(tmp_path_factory, "generator", build)


@pytest.fixture(scope="session")
def gdfq_workdir(small_teacher_workdir, small_data, tmp_path_factory):
  """small_teacher_workdir plus GDFQ's smoke generator warm-up (4 iterations), made once per
  session: copy it before running anything in it (with SMALL_TEACHER_ARGS)."""
  from cli import run_in_process

  def build(workdir):
    copy_workdir(small_teacher_workdir, workdir)
    result = run_in_process("configs/gdfq.py:smoke", workdir, *SMALL_TEACHER_ARGS,
                            f"--config.data.dir={small_data}")
    assert result.returncode == 0, result.stderr[-2000:]

  return prepared_once(tmp_path_factory, "gdfq", build)
