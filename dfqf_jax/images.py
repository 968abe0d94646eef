"""Image grids of generated samples, one row per teacher-predicted class."""
import numpy as np
from PIL import Image, ImageDraw

from dfqf_jax import data, storage

GRID_FILE = "grid.png"  # an image stage's class grid, in its folder


def denormalize(images, mean, std) -> np.ndarray:
  """Normalized NHWC float images -> uint8 for display."""
  x = np.asarray(images) * np.asarray(std) + np.asarray(mean)
  return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


MAX_ROWS = 20


def class_grid(images_uint8: np.ndarray, predicted: np.ndarray, num_classes: int,
               per_row: int = 10, pad: int = 2) -> np.ndarray:
  """Rows = classes (up to `per_row` images each, in batch order); empty cells stay black."""
  n_rows = min(num_classes, MAX_ROWS)
  h, w, c = images_uint8.shape[1:]
  grid = np.zeros((n_rows * (h + pad) + pad, per_row * (w + pad) + pad, c), np.uint8)
  for row in range(n_rows):
    members = np.flatnonzero(predicted == row)[:per_row]
    for col, idx in enumerate(members):
      y, x = pad + row * (h + pad), pad + col * (w + pad)
      grid[y:y + h, x:x + w] = images_uint8[idx]
  return grid


def row_labels(predicted: np.ndarray, class_names) -> list[str]:
  """'<class> (n)' for each grid row; a class the teacher never predicted says so, so that
  its black row does not read as a bug."""
  counts = np.bincount(np.asarray(predicted), minlength=len(class_names))
  return [f"{name} ({n})" if n else f"{name}: none" for name, n in
          zip(class_names[:MAX_ROWS], counts)]


def save_png(path: str, array: np.ndarray, scale: int = 2, labels=(), label_width: int = 110
             ) -> None:
  """The grid scaled by `scale`, with one label per row in a left margin when given."""
  grid = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale),
                                       Image.NEAREST)
  if labels:
    image = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    image.paste(grid, (label_width, 0))
    draw, row_height = ImageDraw.Draw(image), grid.height / len(labels)
    for row, label in enumerate(labels):
      draw.text((4, (row + 0.5) * row_height - 5), label, fill="black")
    grid = image
  storage.save_figure(lambda f: grid.save(f, format="png"), path)


def save_class_grid(path: str, x, classes, teacher_meta: dict) -> None:
  """A PNG of normalized images `x`, one row per class of `classes` (the teacher's
  predictions, or a conditional generator's labels), each row named after its class."""
  classes = np.asarray(classes)
  pictures = denormalize(x, teacher_meta["mean"], teacher_meta["std"])
  save_png(path, class_grid(pictures, classes, teacher_meta["num_classes"]),
           labels=row_labels(classes, data.class_names(teacher_meta["dataset"])))
