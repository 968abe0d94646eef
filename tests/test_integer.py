"""Integer deployment (dfqf_jax.integer, stages/export.py): the integer forward pass against
the fake-quantized model on real test images, the export format, the jax.export artifact in
a process without dfqf_jax, evaluation of exports, and bad input."""
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli import TEST_XLA_FLAGS, run_in_process
from conftest import TEACHER_WEIGHTS, write_small_split
from dfqf_jax import calibration, checkpoints, classifiers, convert, data, integer, validation
from dfqf_jax import quant as q
from dfqf_jax.stages import export

NUM_IMAGES = 8  # test images compared per student


@pytest.fixture(scope="module")
def setup(shared_data):
  """Teacher variables, NUM_IMAGES real test images (uint8 and normalized) and calibration
  summaries from 64 real training images."""
  teacher = convert.torch_resnet_to_flax(convert.load_state_dict_npz(TEACHER_WEIGHTS), 20, 10)
  with np.load(os.path.join(shared_data, "cifar10_test.npz")) as f:
    idx = np.random.default_rng(1).permutation(len(f["labels"]))[:NUM_IMAGES]
    images = f["images"][idx]
  with np.load(os.path.join(shared_data, "cifar10_train.npz")) as f:
    idx = np.random.default_rng(2).permutation(len(f["labels"]))[:64]
    calib = data.normalize(f["images"][idx], data.IMAGENET_MEAN, data.IMAGENET_STD)
  summaries = calibration.summarize(teacher, 20, 10, [calib], ["ft"])
  x = data.normalize(images, data.IMAGENET_MEAN, data.IMAGENET_STD)
  return teacher, images, x, summaries


def student(setup, bits: int, protocol: str):
  teacher, _, _, summaries = setup
  spec = q.QuantSpec(bits, bits, protocol)
  model, variables = calibration.quantized_student(teacher, 20, 10, spec)
  return spec, model, calibration.calibrate(variables, spec, "ft", summaries)


# Every bit width with the standard protocol (per-channel weights, every layer quantized), and
# dfqf's float stem and 8-bit first and last layers at 4 bits (the mixed-precision student of
# test_quant_rules.py is another dfqf export: W4A4 with layer3 at 8 bits).
@pytest.mark.parametrize("bits,protocol", [(8, "standard"), (4, "standard"), (3, "standard"),
                                           (4, "dfqf")])
def test_integer_forward_equals_fake_quant(setup, bits, protocol):
  spec, model, variables = student(setup, bits, protocol)
  graph, arrays = integer.build(variables, spec, 20, 10)
  x = setup[2]
  # Op by op, not one jitted program per student: the four students share most primitives'
  # programs (same shapes), where compiling each student's whole program took 5-9 s.
  fake, exact = model.apply(variables, x), integer.forward(graph, arrays, x)
  layers = integer.layer_by_layer(model, variables, graph, arrays, x)
  unit = np.asarray(integer.output_unit(graph, arrays))
  end_to_end = np.abs(np.asarray(fake) - np.asarray(exact)) / unit
  relative = np.abs(np.asarray(fake) - np.asarray(exact)) / np.std(np.asarray(fake))
  # Each layer fed the fake-quant model's own input: codes equal except float32 rounding
  # ties (off by one at most), and the logits within the output's quantization step.
  mismatched = sum(int(r["mismatched"]) for r in layers.values() if "mismatched" in r)
  total = sum(int(r["total"]) for r in layers.values() if "total" in r)
  head = float(layers["linear"]["max_logit_diff_units"])
  print(f"W{bits}A{bits} {protocol}: layer-local code mismatches {mismatched}/{total}, head "
        f"{head:.3f} output steps; end to end: largest logit difference "
        f"{end_to_end.max():.3f} output steps (median {np.median(end_to_end):.4f}), "
        f"{(np.argmax(fake, -1) == np.argmax(exact, -1)).sum()}/{len(x)} classes agree; "
        f"relative to the logits' spread: median {np.median(relative):.2e}, "
        f"largest {relative.max():.2e}")
  assert mismatched <= 1e-5 * total
  assert max(int(r["max_code_diff"]) for r in layers.values() if "mismatched" in r) <= 1
  assert head < 2.0  # the head's float32 rounding; up to 1.4 steps at 8 bits (integer_check)
  assert all(float(r["max_abs_diff"]) < 1e-4 for r in layers.values() if "max_abs_diff" in r)
  # End to end, a flipped tie propagates through the later layers, and how many ties a
  # machine meets depends on its float32 rounding (x86 FMA or not): at 8 bits the output
  # step is so fine that the median ranged from 0.1 to 8 steps across CI machines. Measured
  # against the logits' spread the result is machine-independent.
  assert np.median(relative) < 1e-3
  assert (np.argmax(fake, -1) == np.argmax(exact, -1)).sum() >= len(x) - 1
  # The integer convolutions really are int8 x int8 -> int32.
  hlo = jax.jit(lambda a, x: integer.forward(graph, a, x)).lower(arrays, x).as_text()
  int8_convs = re.findall(r"convolution.*xi8>, tensor<[^>]*xi8>\) -> tensor<[^>]*xi32>", hlo)
  # The 18 convs of the 9 blocks, less the dfqf protocol's first (it reads the float stem).
  assert len(int8_convs) >= (17 if protocol == "dfqf" else 18), len(int8_convs)
  assert float_roundings(hlo) == FLOAT_ROUNDINGS[protocol]


# Only the layers reading a float tensor round a float32 rescale; the others requantize with
# integer thresholds: the dfqf protocol's layer1_0.conv1 (float stem input) and conv2 (float
# shortcut), the standard protocol's stem (float image input).
FLOAT_ROUNDINGS = {"dfqf": 2, "standard": 1}


def float_roundings(stablehlo_text: str) -> int:
  """Uses of jnp.round (lowered once as a private function, called per use)."""
  return len(re.findall(r"call @round\w*\(", stablehlo_text))


def exact_codes(acc, shortcut, multiplier, offset, shortcut_multiplier, bits):
  """clip(round_half_even(acc * M + r * K + B), 0, 2^bits - 1) in rational arithmetic."""
  codes = np.zeros(acc.shape, np.int64)
  for index in np.ndindex(acc.shape):
    c = index[-1]
    t = (Fraction(int(acc[index])) * Fraction(multiplier[c]) + Fraction(offset[c])
         + Fraction(int(shortcut[index])) * Fraction(shortcut_multiplier))
    codes[index] = min(max(round(t), 0), 2**bits - 1)
  return codes


@pytest.mark.parametrize("bits,shortcut_bits", [(4, 4), (3, 3), (8, 0), (2, 8)])
def test_requantization_is_exact_where_float32_is_not(bits, shortcut_bits):
  """acc * M + r * K + B rounded to the output codes, with M of either sign or zero, equals
  rational arithmetic on every accumulator value, including values a hair below a rounding
  boundary, where the float32 rescale rounds up (the budget student's failure)."""
  rng = np.random.default_rng(bits)
  # Of either sign, zero, and almost zero (the real teacher has |M| ~ 1e-8: huge thresholds).
  multiplier = np.array([0.033041805, -0.02, 0.0, 1.7, 1e-3, -0.5, 3e-9, -2e-8])
  channels = len(multiplier)
  offset = rng.uniform(-10, 10, channels)
  offset[6:] = [1.3, 0.2]  # with acc up to 2^20 these reach a few codes
  acc = rng.integers(-2**20, 2**20, (300, channels)).astype(np.int32)
  acc[:100] = rng.integers(-600, 600, (100, channels))  # the codes' interesting range
  shortcut = rng.integers(0, 2**shortcut_bits, acc.shape).astype(np.int32)
  shortcut_multiplier = 0.37 if shortcut_bits else 0.0
  # Near-ties: t = k - 1/2 - 1e-7 exactly representable in float64, not in float32.
  for c in (0, 1, 3, 5):
    k = 1 + c % (2**bits - 1)
    acc[0, c], shortcut[0, c] = -22 if multiplier[c] > 0 else 22, 0
    offset[c] = k - 0.5 - 1e-7 - float(acc[0, c]) * multiplier[c]
  graph = {"layers": [
      {"name": "x", "op": "conv", "input": "input", "output": "x", "act_bits": shortcut_bits},
      {"name": "l", "op": "conv", "input": "x", "output": "y", "act_bits": bits,
       "shortcut": {"input": "x"} if shortcut_bits else None}]}
  arrays = {"l.multiplier": multiplier, "l.offset": offset,
            "l.shortcut_multiplier": np.float64(shortcut_multiplier)}
  if not shortcut_bits:  # a conv without a residual input: its input still integer codes
    graph["layers"][0]["act_bits"], shortcut = 4, np.zeros_like(acc)
  arrays.update(integer.requant_tables(graph, arrays))
  got = integer.exact_requantize(jnp.asarray(acc), arrays, "l", bits,
                                 jnp.asarray(shortcut) if shortcut_bits else None)
  expected = exact_codes(acc, shortcut, multiplier, offset, shortcut_multiplier, bits)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # The float32 rescale the export used before (and uses for float inputs) gets the
  # near-ties wrong: this test would catch it.
  t32 = (acc.astype(np.float32) * multiplier.astype(np.float32) + offset.astype(np.float32)
         + shortcut.astype(np.float32) * np.float32(shortcut_multiplier))
  float32_codes = np.clip(np.round(t32), 0, 2**bits - 1)
  assert (float32_codes[0] != expected[0]).any(), (float32_codes[0], expected[0])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_codes_pack_and_unpack(bits, signed):
  lo, hi = q.signed_range(bits) if signed else q.unsigned_range(bits)
  codes = np.random.default_rng(bits).integers(lo, hi + 1, (3, 3, 5, 7))
  stored = integer.pack(codes, bits, signed)
  assert stored.nbytes == (codes.size + 1) // 2 if bits <= 4 else codes.size
  np.testing.assert_array_equal(integer.unpack(stored, bits, signed, codes.shape), codes)
  graph = {"layers": [{"name": "l", "weight_bits": bits, "shape": list(codes.shape)}]}
  # unsigned codes are those of per-channel weights, which have zero points
  zero_points = {} if signed else {"l.zero_point": np.zeros(codes.shape[-1], np.int32)}
  in_graph = integer.unpack_in_graph(graph, {"l.codes": stored, **zero_points})["l.codes"]
  np.testing.assert_array_equal(np.asarray(in_graph), codes)


def save_checkpoint(workdir, name, variables, meta):
  checkpoints.save_once(os.path.join(workdir, name), jax.tree.map(jnp.asarray, variables), meta)


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
  """A workdir with the teacher, student_w4a4 (dfqf) and student_w8a8 (standard)
  checkpoints, both exported by the export stage."""
  import configs.export
  workdir = tmp_path_factory.mktemp("integer")
  teacher = setup[0]
  save_checkpoint(workdir, "teacher", teacher, classifiers.classifier_meta(
      20, "cifar10", data.IMAGENET_MEAN, data.IMAGENET_STD, model_name="teacher",
      total_steps=0))
  sizes = {}
  for name, bits, protocol in [("student_w4a4", 4, "dfqf"), ("student_w8a8", 8, "standard")]:
    spec, _, variables = student(setup, bits, protocol)
    save_checkpoint(workdir, name, variables, classifiers.classifier_meta(
        20, "cifar10", data.IMAGENET_MEAN, data.IMAGENET_STD, spec, model_name=name,
        weight_bits=bits, act_bits=bits, protocol=protocol, total_steps=0))
    config = configs.export.get_config(name)
    validation.export(config)
    sizes[name] = export.run(config, str(workdir))
  return workdir, sizes


def test_export_folder(exported, setup):
  workdir, sizes = exported
  folder = workdir / "export" / "student_w4a4"
  assert sorted(os.listdir(folder)) == ["model.json", "model.stablehlo", "weights.npz"]
  assert not [n for n in os.listdir(workdir / "export") if n.startswith(".")]  # no temp left
  graph, arrays = integer.load(str(folder))
  assert (graph["weight_bits"], graph["act_bits"], graph["protocol"]) == (4, 4, "dfqf")
  with np.load(folder / "weights.npz") as stored:
    assert stored["layer2_0.conv1.codes"].dtype == np.uint8  # 4-bit: two codes per byte
    assert stored["layer2_0.conv1.codes"].size == 3 * 3 * 16 * 32 // 2
    assert stored["conv1.codes"].dtype == np.int8  # the dfqf protocol's 8-bit edges
  # What was saved is what was built from the checkpoint (codes unpacked exactly).
  spec, _, variables = student(setup, 4, "dfqf")
  built_graph, built = integer.build(variables, spec, 20, 10)
  assert graph["layers"] == built_graph["layers"] and sorted(arrays) == sorted(built)
  for key, value in built.items():
    np.testing.assert_array_equal(arrays[key], value, err_msg=key)
  # The artifact is the same program: integer requantization but in the float-input layers.
  with open(folder / "model.stablehlo", "rb") as f:
    artifact = integer.deserialize(f.read())
  assert float_roundings(artifact.mlir_module()) == FLOAT_ROUNDINGS["dfqf"]
  # Both sizes well below the float32 model's.
  for name, size in sizes.items():
    assert size["export_bytes"] < size["float32_bytes"] / (2.5 if "w8" in name else 4.5), size


def test_an_export_of_an_older_format_is_refused(exported, tmp_path):
  """Version 1 (float32 rescale constants) cannot be requantized exactly: export again."""
  folder = tmp_path / "student_w4a4"
  shutil.copytree(exported[0] / "export" / "student_w4a4", folder)
  graph = json.loads((folder / "model.json").read_text())
  (folder / "model.json").write_text(json.dumps({**graph, "version": 1}))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"version 1\); export the student again"):
    integer.load(str(folder))


def test_stablehlo_artifact_runs_without_dfqf_jax(exported, shared_data, tmp_path):
  """dfqf_jax/tools/run_exported.py runs both artifacts on an 8-image split in a process that
  never imports dfqf_jax; its logits against dfqf_jax's integer forward pass."""
  workdir, _ = exported
  names = ("student_w4a4", "student_w8a8")
  split_dir = tmp_path / "data"
  split_dir.mkdir()
  write_small_split(os.path.join(shared_data, "cifar10_test.npz"),
                    str(split_dir / "cifar10_test.npz"), 8)
  with np.load(split_dir / "cifar10_test.npz") as f:
    images, labels = f["images"], f["labels"]
  expected = {}
  for name in names:
    graph, arrays = integer.load(str(workdir / "export" / name))
    x = data.normalize(images, graph["mean"], graph["std"])
    expected[name] = np.asarray(integer.forward(graph, arrays, x))  # op by op: run once
    np.save(tmp_path / f"{name}.npy", expected[name])
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # as in this process: 8 images, run once
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dfqf_jax", "tools",
                        "run_exported.py")
  result = subprocess.run(
      [sys.executable, script, *[str(workdir / "export" / n / "model.stablehlo") for n in names],
       "--data-dir", str(split_dir), "--expected-dir", str(tmp_path),
       "--logits-dir", str(tmp_path / "artifact"), "--out", str(tmp_path / "record.json")],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads((tmp_path / "record.json").read_text())
  assert record["test_images"] == 8 and not record["imports_dfqf_jax"]
  for name in names:
    graph, arrays = integer.load(str(workdir / "export" / name))
    logits = np.load(tmp_path / "artifact" / f"{name}.npy")
    unit = np.asarray(integer.output_unit(graph, arrays))
    assert logits.shape == (8, 10)
    # The exported program, compiled, against the same forward pass run op by op: equal up to
    # float32 rounding of the float convs and rescales (a rare tie may flip a code, which then
    # propagates).
    assert np.median(np.abs(logits - expected[name]) / unit) < 1.0
    np.testing.assert_array_equal(logits.argmax(-1), expected[name].argmax(-1))
    # The script's own comparison and top-1 say the same.
    entry = record["results"][name]
    assert entry["comparison"]["class_agreement"] == np.mean(
        logits.argmax(-1) == expected[name].argmax(-1))
    assert entry["top1_percent"] == 100 * np.mean(logits.argmax(-1) == labels)


@pytest.fixture(scope="module")
def tiny_data(shared_data, tmp_path_factory):
  """A data folder with 100 test images."""
  folder = tmp_path_factory.mktemp("tiny_data")
  write_small_split(os.path.join(shared_data, "cifar10_test.npz"),
                    str(folder / "cifar10_test.npz"), 100)
  return str(folder)


def snapshot(folder) -> dict:
  return {os.path.join(root, f): os.path.getmtime(os.path.join(root, f))
          for root, _, files in os.walk(folder) for f in files}


def assert_one_error_line(result, *phrases):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-2000:]
  for phrase in phrases:
    assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("case", ["teacher", "missing student", "another bit width"])
def test_bad_input(case, exported, tiny_data, tmp_path):
  source, _ = exported
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  args = ["configs/export.py", workdir]
  if case == "teacher":
    args.append("--config.student=teacher")
    phrases = ["'teacher' is not a quantized model"]
  elif case == "missing student":
    args.append("--config.student=student_w2a2")
    phrases = ["student_w2a2", "['student_w4a4', 'student_w8a8']"]
  else:  # the W4A4 export's folder holds the W8A8 export
    shutil.rmtree(workdir / "export" / "student_w4a4")
    shutil.copytree(workdir / "export" / "student_w8a8", workdir / "export" / "student_w4a4")
    phrases = ["holds an export of another model", "weight_bits=8", "not overwritten"]
  before = snapshot(workdir)
  assert_one_error_line(run_in_process(*args), *phrases)
  assert snapshot(workdir) == before
  if case == "another bit width":  # evaluate reads a W4A4 graph with W8A8 weight codes
    exports_only = tmp_path / "exports_only"
    shutil.copytree(workdir / "export", exports_only / "export")
    folder = exports_only / "export" / "student_w4a4"
    shutil.copy(source / "export" / "student_w4a4" / "model.json", folder / "model.json")
    before = snapshot(exports_only)
    assert_one_error_line(run_in_process("configs/evaluate.py", exports_only,
                                         f"--config.data.dir={tiny_data}"),
                          "(W4A4, dfqf)", "another bit width")
    assert snapshot(exports_only) == before
