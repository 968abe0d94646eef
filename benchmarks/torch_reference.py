"""PyTorch versions of the reference code's iterations (BowenLi94/DFQF), for timing only.

Written after the reference's train_teacher.py, dfkd.py (stage 1), dfqf.py (stage 2),
models/resnet_cifar.py, models/generator.py and utils/quant_linear.py, doing per iteration
what they do, in the same order:
  teacher:   normalize, forward, cross-entropy, `loss.item()`, backward, SGD step;
  generator: G forward; teacher forward (eval mode) whose BN forward hooks compute the
             BN-statistics term; inception-score term; student forward; L_G backward and
             Adam step; then the student forward *again* on detached images, KD backward,
             SGD step. The teacher's parameters keep requires_grad (the reference only calls
             teacher.eval()), so L_G's backward also computes teacher weight gradients;
  finetune:  under no_grad G forward (training mode) and teacher forward; the fake-quantized
             student (clamp + round-STE, per-tensor clips as nn.Parameters, 8-bit first conv
             and linear, every nn.ReLU of the blocks quantized to unsigned `act_bits`)
             forward, KD backward, SGD step with the clip parameter group, `loss.item()`;
  evaluate:  eval mode, no_grad, forward, cross-entropy, `.item()` of the loss and of the
             number correct.
Not included (also not in the JAX steps): the reference's host-side DataLoader work (PIL
crop/flip/ToTensor/Normalize in the main process; stage 2 also iterates the real training
loader and discards its images), DataParallel wrappers, logging. Inputs are random uint8
images normalized on the device inside the step, as the JAX steps do.
"""
import contextlib
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
LATENT_DIM = 1000
NUM_CLASSES = 10
CALIBRATION_BATCH = 32


# ----------------------------------------------------------------- models/resnet_cifar.py
class LambdaLayer(nn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return self.fn(x)


class BasicBlock(nn.Module):
  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu1 = nn.ReLU()
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu2 = nn.ReLU()
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:  # option A
      self.shortcut = LambdaLayer(
          lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)))

  def forward(self, x):
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += self.shortcut(x)
    return self.relu2(out)


class ResNet(nn.Module):
  def __init__(self, num_blocks=(3, 3, 3), num_classes=NUM_CLASSES):
    super().__init__()
    self.in_planes = 16
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.layer1 = self._make_layer(16, num_blocks[0], 1)
    self.layer2 = self._make_layer(32, num_blocks[1], 2)
    self.layer3 = self._make_layer(64, num_blocks[2], 2)
    self.linear = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight)

  def _make_layer(self, planes, blocks, stride):
    layers = []
    for s in [stride] + [1] * (blocks - 1):
      layers.append(BasicBlock(self.in_planes, planes, s))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = F.avg_pool2d(out, out.size()[3])
    return self.linear(out.view(out.size(0), -1))


# -------------------------------------------------------------------- models/generator.py
class Generator(nn.Module):
  """DAFL generator; BatchNorm2d(128, 0.8) passes 0.8 as eps (the reference's quirk)."""

  def __init__(self, latent_dim=LATENT_DIM, img_size=32, channels=3):
    super().__init__()
    self.init_size = img_size // 4
    self.l1 = nn.Sequential(nn.Linear(latent_dim, 128 * self.init_size**2))
    self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
    self.conv_blocks1 = nn.Sequential(
        nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.BatchNorm2d(128, 0.8),
        nn.LeakyReLU(0.2, inplace=True))
    self.conv_blocks2 = nn.Sequential(
        nn.Conv2d(128, 64, 3, stride=1, padding=1), nn.BatchNorm2d(64, 0.8),
        nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(64, channels, 3, stride=1, padding=1),
        nn.Tanh(), nn.BatchNorm2d(channels, affine=False))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        m.weight.data.normal_(0.0, 0.02)
      elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.zero_()

  def forward(self, z):
    out = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
    img = F.interpolate(self.conv_blocks0(out), scale_factor=2)
    img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
    return self.conv_blocks2(img)


# -------------------------------------------------------------------- utils/quant_linear.py
class RoundSTE(torch.autograd.Function):
  @staticmethod
  def forward(ctx, x):
    return torch.round(x)

  @staticmethod
  def backward(ctx, grad_output):
    return grad_output


def quantize(tensor, num_bits, alpha, signed=True, unique_check=True):
  """The reference's fake quantization, with its per-call checks (`assert alpha > 0`, the
  Python max of a tensor, and `torch.unique` of the result when `unique_check`): they
  synchronize and cost time in every forward of the reference."""
  assert alpha > 0
  qmax = 2 ** (num_bits - 1) - 1 if signed else 2**num_bits - 1
  qmin = -2 ** (num_bits - 1) if signed else 0
  delta = max(alpha / qmax, 1e-8)
  t_q = RoundSTE.apply(torch.clamp(tensor / delta, qmin, qmax))
  if unique_check:
    assert torch.unique(t_q).shape[0] <= 2**num_bits
  return t_q * delta


class QuantReLU(nn.Module):
  def __init__(self, module, num_bits, clip, unique_check):
    super().__init__()
    self.module, self.num_bits, self.unique_check = module, num_bits, unique_check
    self.clip_a = nn.Parameter(torch.tensor([clip]))

  def forward(self, x):
    return quantize(self.module(x), self.num_bits, self.clip_a, False, self.unique_check)


class QuantConv2d(nn.Conv2d):
  def __init__(self, module, num_bits, unique_check):
    super().__init__(module.in_channels, module.out_channels, module.kernel_size,
                     module.stride, module.padding, module.dilation, module.groups,
                     module.bias is not None)
    self.num_bits, self.unique_check = num_bits, unique_check
    self.clip_w = nn.Parameter(module.weight.detach().abs().max().reshape(1))
    self.weight, self.bias = module.weight, module.bias

  def forward(self, x):
    w = quantize(self.weight, self.num_bits, self.clip_w, True, self.unique_check)
    return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(nn.Linear):
  def __init__(self, module, num_bits, unique_check):
    super().__init__(module.in_features, module.out_features, module.bias is not None)
    self.num_bits, self.unique_check = num_bits, unique_check
    self.clip_w = nn.Parameter(module.weight.detach().abs().max().reshape(1))
    self.weight, self.bias = module.weight, module.bias

  def forward(self, x):
    w = quantize(self.weight, self.num_bits, self.clip_w, True, self.unique_check)
    return F.linear(x, w, self.bias)


def relu_input_max(net, images) -> dict:
  """name -> max of each nn.ReLU's input on `images` (the reference's 'max' clip)."""
  clips, hooks = {}, []
  for name, module in net.named_modules():
    if isinstance(module, nn.ReLU):
      hooks.append(module.register_forward_hook(
          lambda m, inputs, out, name=name: clips.__setitem__(name, inputs[0].max().item())))
  with torch.no_grad():
    net.eval()(images)
  for hook in hooks:
    hook.remove()
  return clips


def quantized_copy(net, clips: dict, wbit: int, abit: int, unique_check: bool):
  """utils/collect.py: a copy of `net` with every nn.ReLU, conv and linear fake-quantized;
  the first conv (3 input channels) and the linear layer at 8 bits."""
  student = copy.deepcopy(net)

  def wrap(container, prefix=""):
    for name, module in container.named_children():
      full = prefix + name
      if isinstance(module, nn.ReLU):
        setattr(container, name, QuantReLU(module, abit, clips[full], unique_check))
      elif isinstance(module, nn.Conv2d):
        bits = 8 if module.in_channels == 3 else wbit
        setattr(container, name, QuantConv2d(module, bits, unique_check))
      elif isinstance(module, nn.Linear):
        setattr(container, name, QuantLinear(module, 8, unique_check))
      wrap(module, full + ".")

  wrap(student)
  return student


# ------------------------------------------------------------------------------- losses
def kdloss(output_s, output_t):
  return F.kl_div(F.log_softmax(output_s, dim=1), F.softmax(output_t, dim=1),
                  reduction="sum") / output_s.shape[0]


def add_bn_statistics_hooks(net, terms: list) -> None:
  """dfkd.py's hook_fn: at every BN input, the batch mean / unbiased variance term."""

  def hook(module, inputs, output):
    per_channel = inputs[0].permute(1, 0, 2, 3).flatten(start_dim=1)
    mean, var = per_channel.mean(dim=1), per_channel.var(dim=1)
    var[var == 0] = 1e-8
    bn_kl = (var - module.running_var * torch.log(var)) + torch.pow(mean - module.running_mean, 2)
    terms.append(bn_kl.mean())

  for module in net.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.register_forward_hook(hook)


# -------------------------------------------------------------------------------- steps
MEMORY_FORMAT = torch.channels_last


def _prepare(module, device):
  return module.to(device, memory_format=MEMORY_FORMAT)


def _normalize(images_uint8):
  """uint8 NHWC -> float NCHW (channels_last strides), normalized as the reference does."""
  x = images_uint8.permute(0, 3, 1, 2).float().div(255)
  mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
  std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
  return (x - mean) / std


def _random_batch(batch, device, seed=0):
  g = torch.Generator().manual_seed(seed)
  images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=g)
  labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
  return images.to(device), labels.to(device)


def teacher_step(batch, device, autocast):
  """train_teacher.py, one iteration."""
  net = _prepare(ResNet(), device)
  criterion = nn.CrossEntropyLoss()
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  images, labels = _random_batch(batch, device)

  def step():
    net.train()
    optimizer.zero_grad()
    with autocast():
      loss = criterion(net(_normalize(images)), labels)
    loss.item()
    loss.backward()
    optimizer.step()

  return step


def generator_step(batch, device, autocast, p_is=40.0, p_bn=0.1, p_adv=5.0):
  """dfkd.py, one of the 120 iterations of an epoch."""
  generator = _prepare(Generator(), device)
  teacher = _prepare(ResNet(), device).eval()
  net = _prepare(ResNet(), device)
  bn_terms = []
  add_bn_statistics_hooks(teacher, bn_terms)
  optimizer_g = torch.optim.Adam(generator.parameters(), lr=0.005)
  optimizer_s = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

  def step():
    net.train()
    z = torch.randn(batch, LATENT_DIM, device=device)
    optimizer_g.zero_grad()
    with autocast():
      gen_imgs = generator(z)
      outputs_t = teacher(gen_imgs)
      pyx = F.softmax(outputs_t, dim=1)
      py = pyx.mean(dim=0)
      loss = -nn.KLDivLoss(reduction="sum")(p_is * torch.log(py), pyx) / outputs_t.shape[0]
      loss = loss + p_bn * sum(bn_terms)
      bn_terms.clear()
      loss = loss - p_adv * kdloss(net(gen_imgs), outputs_t)
    loss.backward()
    optimizer_g.step()
    optimizer_s.zero_grad()
    with autocast():
      loss_kd = kdloss(net(gen_imgs.detach()), outputs_t.detach())
    loss_kd.backward()
    optimizer_s.step()

  return step


def finetune_step(batch, device, autocast, unique_check=True, wbit=4, abit=4, s_lr=0.001):
  """dfqf.py FT(), one iteration (clips calibrated by 'max' on one generated batch)."""
  generator = _prepare(Generator(), device)
  teacher = _prepare(ResNet(), device).eval()
  with torch.no_grad():
    calibration_images = generator(torch.randn(CALIBRATION_BATCH, LATENT_DIM, device=device))
  clips = relu_input_max(teacher, calibration_images)
  model_s = quantized_copy(teacher, clips, wbit, abit, unique_check).to(device)
  clip_params = [p for p in model_s.parameters() if p.shape[0] == 1]
  base_params = [p for p in model_s.parameters() if p.shape[0] != 1]
  optimizer_s = torch.optim.SGD(
      [{"params": base_params, "lr": s_lr},
       {"params": clip_params, "lr": s_lr / 10, "momentum": 0.0, "weight_decay": 0}],
      lr=s_lr, momentum=0.9, weight_decay=5e-4)

  def step():
    model_s.train()
    with torch.no_grad(), autocast():
      gen_imgs = generator(torch.randn(batch, LATENT_DIM, device=device))
      outputs_t = teacher(gen_imgs)
    optimizer_s.zero_grad()
    with autocast():
      loss_s = kdloss(model_s(gen_imgs.detach()), outputs_t.detach())
    loss_s.backward()
    optimizer_s.step()
    loss_s.item()

  return step


def evaluate_step(batch, device, autocast):
  """test() of the reference scripts, one batch."""
  net = _prepare(ResNet(), device)
  images, labels = _random_batch(batch, device)

  def step():
    net.eval()
    with torch.no_grad(), autocast():
      outputs = net(_normalize(images))
      nn.CrossEntropyLoss()(outputs, labels).item()
      outputs.max(1)[1].eq(labels).sum().item()

  return step


def device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(stage: str, batch: int, dtype: str, unique_check: bool):
  """A zero-argument callable running one iteration of `stage` and waiting for it."""
  dev = device()
  torch.manual_seed(0)
  cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bfloat16" \
      else contextlib.nullcontext
  steps = {"teacher": teacher_step, "generator": generator_step,
           "finetune": functools.partial(finetune_step, unique_check=unique_check),
           "evaluate": evaluate_step}
  step = steps[stage](batch, dev, cast)
  if dev.type != "cuda":
    return step

  def synchronized():
    step()
    torch.cuda.synchronize()

  return synchronized
