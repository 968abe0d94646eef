"""PyTorch CIFAR ResNet state dict (.npz of named arrays) -> Flax variables of CifarResNet.

Names follow akamaster/pytorch_resnet_cifar10 (optionally with DataParallel's `module.`
prefix): conv1, bn1, layer{1,2,3}.{b}.{conv1,bn1,conv2,bn2}, linear. Conv weights are OIHW
and become HWIO; the dense weight [out, in] becomes [in, out].
"""
import numpy as np

from dfqf_jax import data, fetch, storage, torch_pickle
from dfqf_jax.errors import UserError
from dfqf_jax.models.resnet import blocks_per_stage


class ConversionError(UserError, ValueError):
  """The state dict does not fit the chosen architecture."""


def _expected_layers(depth: int) -> dict[str, str]:
  """torch prefix -> flax module path ('/'-joined) for every conv, bn and dense layer."""
  layers = {"conv1": "conv1", "bn1": "bn1", "linear": "linear"}
  for stage in range(1, 4):
    for block in range(blocks_per_stage(depth)):
      for part in ("conv1", "bn1", "conv2", "bn2"):
        layers[f"layer{stage}.{block}.{part}"] = f"layer{stage}_{block}/{part}"
  return layers


def _nest(tree: dict, path: str, leaf: str, value: np.ndarray) -> None:
  node = tree
  for key in path.split("/"):
    node = node.setdefault(key, {})
  node[leaf] = value


def torch_resnet_to_flax(state_dict: dict, depth: int, num_classes: int) -> dict:
  """Returns {'params': ..., 'batch_stats': ...} for CifarResNet(depth, num_classes)."""
  tensors = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state_dict.items()
             if not k.endswith("num_batches_tracked")}
  layers = _expected_layers(depth)
  params, batch_stats, used = {}, {}, set()

  def take(name, ndim):
    if name not in tensors:
      raise ConversionError(
          f"the weights have no tensor {name!r} needed by a ResNet-{depth}; "
          f"set model.depth to the depth the weights were trained with.")
    if tensors[name].ndim != ndim:
      raise ConversionError(f"tensor {name!r} has shape {tensors[name].shape}; "
                            f"a ResNet-{depth} needs a {ndim}-d tensor there.")
    used.add(name)
    return tensors[name]

  for torch_name, flax_path in layers.items():
    if torch_name == "linear":
      weight = take("linear.weight", 2)
      if weight.shape[0] != num_classes:
        raise ConversionError(f"linear.weight has {weight.shape[0]} outputs but the dataset "
                              f"has {num_classes} classes; choose the matching data.name.")
      _nest(params, flax_path, "kernel", weight.T)
      _nest(params, flax_path, "bias", take("linear.bias", 1))
    elif ".conv" in torch_name or torch_name == "conv1":
      _nest(params, flax_path, "kernel", take(f"{torch_name}.weight", 4).transpose(2, 3, 1, 0))
    else:
      _nest(params, flax_path, "scale", take(f"{torch_name}.weight", 1))
      _nest(params, flax_path, "bias", take(f"{torch_name}.bias", 1))
      _nest(batch_stats, flax_path, "mean", take(f"{torch_name}.running_mean", 1))
      _nest(batch_stats, flax_path, "var", take(f"{torch_name}.running_var", 1))

  unused = sorted(set(tensors) - used)
  if unused:
    raise ConversionError(
        f"the weights hold {len(unused)} tensors a ResNet-{depth} does not have (first: "
        f"{unused[0]!r}); set model.depth to the depth the weights were trained with.")
  return {"params": params, "batch_stats": batch_stats}


def load_state_dict(weights: str) -> tuple[dict, str]:
  """(named arrays, where they came from) of `weights`: a pretrained name from
  fetch.PRETRAINED (downloaded and cached on first use), a torch.save file (.th/.pt, read
  without PyTorch) or a state dict saved as .npz."""
  if weights in fetch.PRETRAINED:
    return load_state_dict_npz(fetch.pretrained(weights)), weights
  if not weights or not storage.isfile(weights):
    raise ConversionError(
        f"weights={weights!r} is neither a file nor a pretrained name; give a state dict "
        "(.npz, or a PyTorch .th/.pt), e.g. ../shared/data/resnet20-12fca82f_weights.npz, or "
        f"one of {sorted(fetch.PRETRAINED)}.")
  if weights.endswith((".th", ".pt", ".pth")):
    raw = storage.read_bytes(weights)
    return _checked(torch_pickle.state_dict(torch_pickle.load(raw, weights), weights),
                    weights), storage.absolute(weights)
  return load_state_dict_npz(weights), storage.absolute(weights)


def load_state_dict_npz(path: str) -> dict:
  """The named arrays of a PyTorch state dict saved as .npz, each finite."""
  return _checked(data.read_npz(
      path, "Export the state dict again (numpy.savez of each tensor)."), path)


def _checked(tensors: dict, path: str) -> dict:
  for name, value in tensors.items():
    if not np.issubdtype(value.dtype, np.number):
      raise ConversionError(f"{path}: tensor {name!r} has dtype {value.dtype}, not numbers; "
                            "export the state dict's tensors as numeric arrays.")
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      raise ConversionError(f"{path}: tensor {name!r} holds NaN or Inf values; these weights "
                            "are broken: export them again from a healthy checkpoint.")
  return tensors
