"""Generator grids: one labelled row per class; a class the teacher never predicted says so."""
import numpy as np
from PIL import Image

from dfqf_jax import data, images


def test_grid_rows_are_labelled_and_an_empty_class_says_so(tmp_path):
  predicted = np.array([0, 0, 2])
  labels = images.row_labels(predicted, data.class_names("cifar10"))
  assert labels[:3] == ["airplane (2)", "automobile: none", "bird (1)"]
  assert len(labels) == 10 and labels[-1] == "truck: none"
  pictures = np.full((3, 32, 32, 3), 255, np.uint8)
  grid = images.class_grid(pictures, predicted, 10)
  images.save_png(str(tmp_path / "grid.png"), grid, labels=labels, label_width=100)
  with Image.open(tmp_path / "grid.png") as saved:
    assert saved.size == (2 * grid.shape[1] + 100, 2 * grid.shape[0])
    margin = np.asarray(saved.convert("L"))[:, :100]
  assert margin.min() < 128  # text drawn in the margin


def test_cifar100_rows_are_numbered():
  assert data.class_names("cifar100")[17] == "class 17"
  assert len(images.row_labels(np.array([3]), data.class_names("cifar100"))) == images.MAX_ROWS
