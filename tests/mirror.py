"""A loopback stand-in for the download sources: CIFAR python archives built from .npz
splits (same layout as the published ones), the published .th weights, an HTTP server on
127.0.0.1 and the $DFQF_SOURCES file that points fetch.py at it.

  python tests/mirror.py --data ../shared/data --out /tmp/mirror [--images-per-split N]
builds the files, writes /tmp/mirror/sources.json and serves until interrupted, e.g. for
  DFQF_DATA_DIR=$(mktemp -d) DFQF_SOURCES=/tmp/mirror/sources.json .venv/bin/python main.py ...
"""
import argparse
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import tarfile
import threading

import numpy as np

WEIGHTS = {"resnet20_cifar10": "resnet20-12fca82f.th", "resnet56_cifar10": "resnet56-4bfd9763.th"}
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def _batch_bytes(images: np.ndarray, labels: np.ndarray, label_key: bytes) -> bytes:
  """One pickled batch as the published archives hold it (python-2 style bytes keys)."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return pickle.dumps({b"data": planes, label_key: [int(v) for v in labels]}, protocol=2)


def cifar_archive(name: str, train: dict, test: dict) -> bytes:
  """A .tar.gz with the published member names: cifar-10 splits train into 5 batches."""
  if name == "cifar10":
    chunks = np.array_split(np.arange(len(train["labels"])), 5)
    members = {f"cifar-10-batches-py/data_batch_{i + 1}": (train, rows)
               for i, rows in enumerate(chunks)}
    members["cifar-10-batches-py/test_batch"] = (test, slice(None))
    label_key = b"labels"
  else:
    members = {"cifar-100-python/train": (train, slice(None)),
               "cifar-100-python/test": (test, slice(None))}
    label_key = b"fine_labels"
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w:gz") as tar:
    for member, (split, rows) in members.items():
      payload = _batch_bytes(split["images"][rows], split["labels"][rows], label_key)
      info = tarfile.TarInfo(member)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return out.getvalue()


def _subset(path: str, size: int | None, seed: int = 0) -> dict:
  with np.load(path) as f:
    images, labels = f["images"], f["labels"]
  if size is not None:
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:size])
    images, labels = images[keep], labels[keep]
  return {"images": images, "labels": labels.astype(np.int64)}


def build(data_dir: str, out: str, images_per_split: int | None = None) -> dict:
  """Writes the archives and weights into `out`; returns name -> (file, sha256). CIFAR-100
  is CIFAR-10's images with 100-class labels made up from them (only the format matters)."""
  os.makedirs(out, exist_ok=True)
  train = _subset(os.path.join(data_dir, "cifar10_train.npz"), images_per_split)
  test = _subset(os.path.join(data_dir, "cifar10_test.npz"), images_per_split)
  as_100 = lambda s: {"images": s["images"], "labels": (s["labels"] * 10 + np.arange(
      len(s["labels"])) % 10).astype(np.int64)}
  files = {"cifar10": (ARCHIVES["cifar10"], cifar_archive("cifar10", train, test)),
           "cifar100": (ARCHIVES["cifar100"], cifar_archive("cifar100", as_100(train),
                                                            as_100(test)))}
  for name, file in WEIGHTS.items():
    with open(os.path.join(data_dir, file), "rb") as f:
      files[name] = (file, f.read())
  listing = {}
  for name, (file, payload) in files.items():
    with open(os.path.join(out, file), "wb") as f:
      f.write(payload)
    listing[name] = (file, hashlib.sha256(payload).hexdigest())
  return listing


class Server:
  """Serves a folder on 127.0.0.1 (a free port) from a thread; counts GET requests."""

  def __init__(self, folder: str):
    self.requests = []
    server = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def do_GET(self):
        server.requests.append(self.path)
        super().do_GET()

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=folder))
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


def write_sources(path: str, base_url: str, listing: dict) -> None:
  """$DFQF_SOURCES: every source at `base_url`, with the checksum of the file served."""
  with open(path, "w") as f:
    json.dump({name: {"url": f"{base_url}/{file}", "sha256": sha}
               for name, (file, sha) in listing.items()}, f, indent=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--images-per-split", type=int, default=None)
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  listing = build(args.data, args.out, args.images_per_split)
  with Server(args.out) as server:
    write_sources(os.path.join(args.out, "sources.json"), server.url, listing)
    print(f"serving {args.out} at {server.url}; sources: {args.out}/sources.json", flush=True)
    server.thread.join()


if __name__ == "__main__":
  main()
