"""gcp-storage-emulator for the gs:// tests, serving until killed:

  python tests/gcs_emulator.py PORT BUCKET

One addition: media downloads carry the object's generation in `x-goog-generation`, as Cloud
Storage's do. tensorstore (which Orbax writes and reads arrays with) requires that header;
the emulator leaves it out.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])


def main(port: int, bucket: str) -> None:
  objects.download = download_with_generation  # objects.get(alt=media) calls it by name
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is _download:
        handlers[method] = download_with_generation
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  emulator.run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
