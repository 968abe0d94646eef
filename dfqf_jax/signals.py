"""SIGTERM and SIGINT (Ctrl-C) in every stage: a `stopped:` line, the shell's exit code, the
workdir's lock released and nothing half-written.

main.py runs every job under `stop_on_signal`: a signal raises StoppedBySignal where the job
is (loading, calibrating, evaluating, writing the report), which unwinds through the lock's
release. What must not be cut in two runs under `deferred` (a checkpoint save with its wall
time): a signal there stops the job right after it. The training loop (training.run_steps)
defers signals the same way for a whole step, saves that step, then stops. Files themselves
are written atomically (storage.write_atomically; Orbax renames a finished checkpoint into
place), so a stop never leaves a partial one, and rerunning the same command continues.

Exit codes follow the shell's convention, 128 + the signal's number: 143 for SIGTERM (what a
scheduler or `kill` sends), 130 for SIGINT (Ctrl-C). Once a job is stopping, further
signals are ignored, so that its cleanup runs to the end (SIGKILL still ends it at once).
Outside the job (main.py's process once the job has finished, stopped or failed, while the
interpreter shuts down) there is nothing left to stop: signals are ignored there
(`ignore_outside_jobs`), so such a process exits with its job's own code, never killed
half-way through its exit without a line.
"""
import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(BaseException):
  """SIGTERM/SIGINT stopped `name` (at training step `step`, after saving it). The whole
  invocation stops (a pipeline does not go on to build on an unfinished stage); main.py exits
  with `exit_code`, and rerunning the same command continues. A BaseException, as
  KeyboardInterrupt is: the `except Exception` around a library call (a checkpoint read that
  turns any failure into "cannot be read") must not turn a stop into a user error."""

  def __init__(self, name: str, signum: int, step: int | None = None):
    where = f"at step {step}; its checkpoint is saved" if step is not None else (
        "before it finished; what it completed is saved")
    super().__init__(f"{name}: stopped by {signal.Signals(signum).name} {where}. Rerun the "
                     "same command to continue.")
    self.name, self.signum, self.step = name, signum, step

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class _State:
  depth = 0  # nested stop_on_signal blocks
  names: list[str] = []  # what is running, innermost last (named in the `stopped:` line)
  stopping = False  # StoppedBySignal is on its way up: ignore further signals
  pending: "StoppedBySignal | None" = None  # the stop raised (raise_if_stopped raises it again)
  deferred: list | None = None  # inside `deferred`: the signals received, handled at its end


def stop(name: str, signum: int, step: int | None = None) -> StoppedBySignal:
  """The StoppedBySignal to raise for `signum`; from now on the job ignores signals."""
  _State.stopping = True
  _State.pending = StoppedBySignal(name, signum, step)
  return _State.pending


def raise_if_stopped() -> None:
  """Raises the stop a signal asked for again. A handler's exception raised inside a
  callback whose exceptions Python only prints (a garbage-collection or weakref callback,
  JAX's compilation-cache read) is lost there, and the job would go on ignoring signals; the
  stages call this between units of work (steps, PTQ models, evaluated folders), and
  stop_on_signal at its end."""
  if _State.pending is not None:
    raise _State.pending


def _handle(signum, frame):
  del frame
  if _State.stopping:
    return
  if _State.deferred is not None:
    _State.deferred.append(signum)
    return
  raise stop(_State.names[-1] if _State.names else "job", signum)


def ignore_outside_jobs() -> None:
  """SIGTERM/SIGINT ignored by this process except within `stop_on_signal` (main.py's entry
  point; Python keeps an ignored signal ignored until the process has exited)."""
  for sig in SIGNALS:
    signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def stop_on_signal(name: str):
  """Within: SIGTERM/SIGINT raise StoppedBySignal(name) (nested: the innermost name).
  Outside the main thread (where Python cannot handle signals) it does nothing."""
  previous = {}
  _State.names.append(name)
  _State.depth += 1
  try:
    for sig in SIGNALS:
      with contextlib.suppress(ValueError):  # not the main thread
        previous[sig] = signal.signal(sig, _handle)
    yield
    raise_if_stopped()  # a stop lost in a callback: the job stops here at the latest
  finally:
    _State.names.pop()
    _State.depth -= 1
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    if _State.depth == 0:  # the job is over (a test may run the next one)
      _State.stopping, _State.pending = False, None


@contextlib.contextmanager
def deferred():
  """Within: a signal is recorded in the yielded list instead of stopping the job; at the
  end (the work done) the first one stops it as it would have. The training loop reads the
  list between steps and stops by itself (raising `stop(...)`)."""
  if _State.deferred is not None:  # nested: the outermost decides
    yield _State.deferred
    return
  _State.deferred = received = []
  try:
    yield received
  finally:
    _State.deferred = None
  if received and not _State.stopping:
    _handle(received[0], None)
  raise_if_stopped()
