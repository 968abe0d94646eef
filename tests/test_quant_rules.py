"""Quantization rules as data (dfqf_jax.quant.QuantSpec.rules): the protocols' rule lists,
per-layer rules from the command line (mixed precision: some layers at other bit widths),
and a mixed student read the same way by the model, calibration, fine-tuning's optimizer and
the integer export. (Mixed *compute* precision, bfloat16, is tests/test_mixed_precision.py.)"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import finetune as finetune_config
from conftest import TEACHER_WEIGHTS
from dfqf_jax import calibration, convert, data, integer, parallel, validation
from dfqf_jax import quant as q
from dfqf_jax.models.resnet import CifarResNet, layer_paths, layer_sizes
from dfqf_jax.stages import finetune

MIXED = "layer3.*=w8a8,layer1_0/.*=w4a4:fixed"  # the last stage at 8 bits, one block's clips fixed


def test_the_protocols_are_two_rule_lists():
  dfqf, standard = q.QuantSpec(4, 4, "dfqf"), q.QuantSpec(3, 3, "standard")
  assert [r.describe() for r in dfqf.rules] == ["conv1|linear=w8a-:per_tensor",
                                                ".*=w4a4:per_tensor"]
  assert [r.describe() for r in standard.rules] == [".*=w3a3:per_channel"]
  # The stem's ReLU output: float under dfqf, quantized under standard.
  assert dfqf.rule_of("conv1").act_bits is None and standard.rule_of("conv1").act_bits == 3


def test_command_line_rules_come_first_with_the_protocols_granularity():
  spec = q.QuantSpec(4, 4, "standard", layer_rules="layer3.*=w8a8,conv1=w6a5:mse:fixed")
  assert [r.describe() for r in spec.rules] == [
      "layer3.*=w8a8:per_channel", "conv1=w6a5:per_channel:fixed:mse", ".*=w4a4:per_channel"]
  assert spec.rule_of("layer3_2/conv2").weight_bits == 8
  assert spec.rule_of("layer2_2/conv2").weight_bits == 4
  assert spec.rule_of(("conv1",)).calibration == "mse"
  assert spec.name_suffix() == "_standard_layer3-w8a8+conv1-w6a5-mse-fixed"
  assert "layer_rules" not in q.QuantSpec(4, 4).meta()  # uniform students' metadata as before


@pytest.mark.parametrize("rules, phrase", [
    ("layer3.*", "is not of the form PATTERN=w<W>a<A>"),
    ("layer3.*=w9a8", "bit widths [9]"),
    ("layer3.*=w8a8:often", "options ['often']"),
    ("layer3[=w8a8", "is not of the form"),
    ("layer4.*=w8a8", "'layer4.*' matches no layer of a ResNet-20"),
    ("conv=w8a8", "'conv' matches no layer"),  # matched against the whole path
])
def test_a_rule_that_cannot_apply_is_one_config_error(rules, phrase):
  config = finetune_config.get_config("w4a4,smoke")
  config.rules = rules
  with pytest.raises(validation.ConfigError) as error:
    validation.quant_specs(config)
  assert phrase in str(error.value) and "\n" not in str(error.value)


def test_the_pipeline_gives_its_rules_to_every_student_and_ptq_model():
  from configs import pipeline as pipeline_config
  from dfqf_jax.stages import pipeline
  config = pipeline_config.get_config("smoke")
  config.rules = "layer3.*=w8a8"
  config.finetune_stage.protocol = "dfqf,standard"
  stages = {name: sub for name, _, _, sub in pipeline.stage_configs(config)}
  assert sorted(n for n in stages if n.startswith("finetune_")) == [
      "finetune_w4a4_layer3-w8a8", "finetune_w4a4_standard_layer3-w8a8"]
  assert {stages[n].rules for n in stages if n.startswith(("finetune_", "ptq"))} == {
      "layer3.*=w8a8"}
  pipeline.validate(config)
  config.rules = "layer4.*=w8a8"
  with pytest.raises(validation.ConfigError, match="matches no layer"):
    pipeline.validate(config)


def test_average_bits_weigh_each_tensor_by_its_size():
  """Against a count over the built model's own kernels."""
  spec = q.QuantSpec(4, 4, "dfqf", layer_rules="layer3.*=w8a8")
  shapes = jax.eval_shape(lambda: CifarResNet(20, quant=spec).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  kernels = {"/".join(p[:-1]): np.prod(s.shape) for p, s in
             traverse_util.flatten_dict(shapes["params"]).items() if p[-1] == "kernel"}
  assert sorted(kernels) == sorted(layer_paths(20))
  weight_bits = sum(spec.weight_bits_of(p) * n for p, n in kernels.items()) / sum(
      kernels.values())
  w, a = spec.average_bits(layer_sizes(20, 10))
  assert w == pytest.approx(weight_bits)
  # activations: the float stem output (16 x 32 x 32, counted as 32 bits), 6 ReLUs of
  # 16 x 32 x 32 and 6 of 32 x 16 x 16 at 4 bits, 6 of 64 x 8 x 8 at 8 bits
  assert a == pytest.approx((32 * 16384 + 4 * (6 * 16384 + 6 * 8192) + 8 * 6 * 4096)
                            / (7 * 16384 + 6 * 8192 + 6 * 4096))


@pytest.fixture(scope="module")
def mixed_student(shared_data):
  """A W4A4 dfqf student with layer3 at 8 bits (and layer1_0's clips fixed), calibrated on
  32 real training images, and 16 test images."""
  teacher = convert.torch_resnet_to_flax(convert.load_state_dict_npz(TEACHER_WEIGHTS), 20, 10)
  with np.load(os.path.join(shared_data, "cifar10_train.npz")) as f:
    idx = np.random.default_rng(3).permutation(len(f["labels"]))[:32]
    calib = data.normalize(f["images"][idx], data.IMAGENET_MEAN, data.IMAGENET_STD)
  with np.load(os.path.join(shared_data, "cifar10_test.npz")) as f:
    images = f["images"][np.random.default_rng(4).permutation(len(f["labels"]))[:16]]
  spec = q.QuantSpec(4, 4, "dfqf", layer_rules=MIXED)
  student, variables = calibration.quantized_student(teacher, 20, 10, spec)
  summaries = calibration.summarize(teacher, 20, 10, [calib], ["ft"])
  return teacher, spec, student, calibration.calibrate(variables, spec, "ft", summaries), images


def test_a_mixed_student_fine_tunes_exports_and_equals_its_integer_model(mixed_student):
  teacher_vars, spec, student, calibrated, images = mixed_student
  config = finetune_config.get_config("w4a4,smoke")
  config.data_source, config.rules, config.clip_learning_rate = "real", MIXED, 1e-2
  # BNs frozen: under batch statistics a conv's output scale (its weight clip, or the clip
  # of the ReLU before it) is normalized away, and those clips' gradients all but vanish.
  config.student_bn_train = False
  mesh = parallel.make_mesh()
  state, step = finetune.create_state_and_step(
      config, CifarResNet(20), None, (student, calibrated), mesh,
      (data.IMAGENET_MEAN, data.IMAGENET_STD))
  replicated_teacher = parallel.replicate(mesh, teacher_vars)
  for _ in range(2):
    state, _ = step(state, parallel.global_batch(mesh, {"images": images})["images"],
                    replicated_teacher)
  variables = jax.device_get(state.student)
  before, after = (traverse_util.flatten_dict(v["params"]) for v in (calibrated, variables))
  clips = [p for p in before if q.is_clip(p)]
  fixed = [p for p in clips if p[0] == "layer1_0"]
  assert len(fixed) == 4 and all(before[p] == after[p] for p in fixed)  # kept as calibrated
  unchanged = [p for p in clips if p not in fixed and before[p] == after[p]]
  assert not unchanged, unchanged  # learned

  graph, arrays = integer.build(variables, spec, 20, 10)
  widths = {layer["name"]: (layer["weight_bits"], layer.get("act_bits")) for layer in
            graph["layers"]}
  assert widths["conv1"] == (8, None) and widths["linear"][0] == 8
  assert {widths[f"layer3_{b}.conv{k}"] for b in range(3) for k in (1, 2)} == {(8, 8)}
  assert {widths[f"layer{s}_{b}.conv{k}"] for s in (1, 2) for b in range(3)
          for k in (1, 2)} == {(4, 4)}
  assert graph["layer_rules"] == MIXED
  x = data.normalize(images, data.IMAGENET_MEAN, data.IMAGENET_STD)
  # Op by op, as tests/test_integer.py does (its students' primitives are these).
  fake, exact = student.apply(variables, x), integer.forward(graph, arrays, x)
  layers = integer.layer_by_layer(student, variables, graph, arrays, x)
  # As for the uniform students (tests/test_integer.py): codes equal up to float32 rounding
  # ties, the logits within the output's step, the same classes.
  mismatched = sum(int(r["mismatched"]) for r in layers.values() if "mismatched" in r)
  total = sum(int(r["total"]) for r in layers.values() if "total" in r)
  assert mismatched <= 1e-5 * total
  assert float(layers["linear"]["max_logit_diff_units"]) < 2.0
  relative = np.abs(np.asarray(fake) - np.asarray(exact)) / np.std(np.asarray(fake))
  assert np.median(relative) < 1e-3
  assert (np.argmax(fake, -1) == np.argmax(exact, -1)).sum() >= len(x) - 1
