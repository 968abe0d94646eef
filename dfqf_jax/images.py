"""Image grids of generated samples, one row per teacher-predicted class."""
import numpy as np
from PIL import Image

from dfqf_jax import storage


def denormalize(images, mean, std) -> np.ndarray:
  """Normalized NHWC float images -> uint8 for display."""
  x = np.asarray(images) * np.asarray(std) + np.asarray(mean)
  return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def class_grid(images_uint8: np.ndarray, predicted: np.ndarray, num_classes: int,
               per_row: int = 10, pad: int = 2) -> np.ndarray:
  """Rows = classes (up to `per_row` images each, in batch order); empty cells stay black."""
  n_rows = min(num_classes, 20)
  h, w, c = images_uint8.shape[1:]
  grid = np.zeros((n_rows * (h + pad) + pad, per_row * (w + pad) + pad, c), np.uint8)
  for row in range(n_rows):
    members = np.flatnonzero(predicted == row)[:per_row]
    for col, idx in enumerate(members):
      y, x = pad + row * (h + pad), pad + col * (w + pad)
      grid[y:y + h, x:x + w] = images_uint8[idx]
  return grid


def save_png(path: str, array: np.ndarray, scale: int = 2) -> None:
  image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale),
                                        Image.NEAREST)
  storage.save_figure(lambda f: image.save(f, format="png"), path)
