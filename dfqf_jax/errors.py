"""The one base class of errors a user can fix: main.py prints each as one `error:` line and
exits with code 2. Subclasses name where the problem lies (config, data, checkpoint, ...)."""


class UserError(Exception):
  """Bad input or state the user can fix; the message names the problem and the fix."""
