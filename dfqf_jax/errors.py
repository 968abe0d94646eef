"""The one base class of errors a user can fix: main.py prints each as one `error:` line and
exits with code 2. Subclasses name where the problem lies (config, data, checkpoint, ...)."""


class UserError(Exception):
  """Bad input or state the user can fix; the message names the problem and the fix."""


def brief(error: Exception, limit: int = 300) -> str:
  """'Type: the first line of its message' (cut at `limit` characters) of an error raised
  deep inside a library (Orbax, tensorstore, gcsfs), whose messages can run to many lines:
  of its root cause (the last `raise ... from` that says something), which names what was
  found (Orbax's "Encountered error while reading array index" wraps tensorstore's
  "OUT_OF_RANGE: ... byte range ... is not valid")."""
  cause = error.__cause__
  while cause is not None:
    if str(cause).strip():
      error = cause
    cause = cause.__cause__
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."
