"""Pieces shared by the training stages: optimizers, schedules, logging and the step loop."""
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dfqf_jax import checkpoints, signals, storage, top1
from dfqf_jax.errors import UserError

STOPPED_KEY = "stopped_by_signal"  # logged at the step where SIGTERM/SIGINT ended a run
METRICS_FILE = "metrics.jsonl"  # a stage's logged metrics, one JSON line per logged step


class NonFiniteLossError(UserError, FloatingPointError):
  """A loss became NaN or Inf; the last good checkpoint is kept."""


def compute_dtype(config) -> jnp.dtype:
  """The training steps' compute dtype (config.compute_dtype); parameters stay float32."""
  return jnp.dtype(config.compute_dtype)


def sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 5e-4,
        nesterov: bool = False):
  """PyTorch SGD: coupled L2 (added to the gradient before momentum), v = m v + g, p -= lr v;
  with `nesterov`, p -= lr (g + m v) (PyTorch's nesterov=True, GDFQ's optimizer)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def step_decay(base_lr: float, milestones: list[float], steps_per_epoch: int,
               factor: float = 0.1):
  """lr x factor at each milestone epoch (PyTorch MultiStepLR, stepped once per epoch)."""
  boundaries = {int(round(m * steps_per_epoch)): factor for m in milestones}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def jit_step(step: Callable, schedule: Callable, metric: str = "learning_rate"):
  """jit(step) with the state (its first argument) donated and `metric` = schedule(state.step)
  added to the metrics: the logged learning rate is computed inside the step, no host-side
  op per step."""
  def step_with_schedule(state, *args):
    new_state, metrics = step(state, *args)
    return new_state, {**metrics, metric: schedule(state.step)}

  return jax.jit(step_with_schedule, donate_argnums=0)


def resume(ckpt, directory: str, state, meta: dict, name: str):
  """(state, start step): the stage's latest checkpoint if there is one (saying so), else
  the given initial state and step 0. See checkpoints.resume."""
  state, start = checkpoints.resume(ckpt, directory, state, meta)
  if start:
    print(f"{name}: resuming from step {start}")
  return state, start


def is_main_process() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """metrics.jsonl + TensorBoard event files, written by process 0 only."""

  def __init__(self, directory: str, start_step: int = 0):
    """Appends to the stage's log; rows after `start_step` (the checkpoint a run resumes
    from) are dropped first, so a resumed run logs every step exactly once."""
    self._jsonl = None
    self._tb = None
    if is_main_process():
      storage.makedirs(directory)
      # A resumed run is no longer one that a signal stopped: drop that mark, keep the step.
      kept = [{k: v for k, v in r.items() if k != STOPPED_KEY}
              for r in read_metrics(directory) if r["step"] <= start_step]
      self._jsonl = storage.LineLog(os.path.join(directory, METRICS_FILE),
                                    [json.dumps(r) + "\n" for r in kept])
      self._tb = storage.summary_writer(os.path.join(directory, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if self._jsonl is None:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()


WALL_FILE = "wall_seconds.json"


def add_wall_time(directory: str, seconds: float) -> None:
  """Adds to the stage's wall time, summed over all the invocations that worked on it."""
  if not is_main_process():
    return
  total = read_wall_time(directory) or 0.0
  storage.write_atomically(os.path.join(directory, WALL_FILE),
                           json.dumps({"seconds": round(total + seconds, 1)}))


def read_wall_time(directory: str) -> float | None:
  path = os.path.join(directory, WALL_FILE)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))["seconds"]


def read_metrics(directory: str) -> list[dict]:
  """The rows of `directory/metrics.jsonl`, keeping the last row per step (resumed runs)."""
  path = os.path.join(directory, METRICS_FILE)
  if not storage.exists(path):
    return []
  rows = {}
  for line in storage.read_text(path).splitlines():
    if line.strip():
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(row)
  return [rows[s] for s in sorted(rows)]


def mean_metrics(history: list[dict]) -> dict:
  """Averages a list of per-step metric dicts fetched from the devices in one transfer."""
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def check_finite(metrics: dict, step: int, loss_keys) -> None:
  for key in loss_keys:
    if key in metrics and not math.isfinite(metrics[key]):
      raise NonFiniteLossError(
          f"the loss term {key!r} became {metrics[key]} by step {step}; the run stopped and "
          "the last good checkpoint is kept. Lower the learning rate or the loss weights.")


def run_steps(*, name: str, ckpt, state, start_step: int, total_steps: int,
              train_step: Callable, meta: dict, log_every: int, loss_keys=("loss",),
              evaluate: Callable | None = None, eval_every: int = 0,
              evaluate_start: bool = False):
  """Runs steps [start_step, total_steps) of a stage, logging to the checkpoint folder.

  train_step(state, step) -> (state, metrics) dispatches one jitted step without waiting
  for it. Metrics stay on device and are fetched every `log_every` steps (one transfer),
  checked for NaN/Inf and written. Checkpoints are saved every `ckpt`'s interval, only right
  after a finite check, and at the end. SIGTERM/SIGINT let the current step finish, save it
  and stop (signals.py). evaluate(state, step) -> dict of monitoring metrics, every
  `eval_every` steps (and at step 0 of a fresh run with `evaluate_start`). Closes the
  checkpoint manager at the end.
  Returns the final state; raises StoppedBySignal after saving if a signal arrived.
  """
  writer = MetricWriter(str(ckpt.directory), start_step)
  try:
    if evaluate_start and evaluate is not None and start_step == 0:
      if is_main_process():
        print(f"{name}: evaluating the starting point", file=sys.stderr, flush=True)
      writer.write(0, evaluate(state, 0))
    return _run_steps(name=name, ckpt=ckpt, state=state, start_step=start_step,
                      total_steps=total_steps, train_step=train_step, meta=meta,
                      writer=writer, log_every=log_every, loss_keys=loss_keys,
                      evaluate=evaluate, eval_every=eval_every)
  finally:
    writer.close()
    ckpt.close()


@jax.jit
def _all_finite(state) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def check_finite_state(state, step: int, loss_keys) -> None:
  """A save never stores NaN/Inf: the losses logged so far are computed before each update,
  so they can all be finite while the last update already overflowed the parameters."""
  if not bool(_all_finite(state)):
    raise NonFiniteLossError(
        f"the training state became NaN or Inf by step {step} (the losses "
        f"{', '.join(map(repr, loss_keys))} were still finite); the run stopped and the last "
        "good checkpoint is kept. Lower the learning rate or the loss weights.")


def _run_steps(*, name, ckpt, state, start_step, total_steps, train_step, meta, writer,
               log_every, loss_keys, evaluate, eval_every):
  history, evaluated = [], {}
  if is_main_process() and start_step < total_steps:  # the first call compiles, silently
    print(f"{name}: compiling the step, then steps {start_step + 1}..{total_steps}",
          file=sys.stderr, flush=True)
  started = last_saved = time.time()
  with signals.stop_on_signal(name), signals.deferred() as received, tqdm(
      total=total_steps, initial=start_step, desc=name, disable=not is_main_process(),
      dynamic_ncols=True, mininterval=2.0) as bar:
    for step in range(start_step, total_steps):
      state, metrics = train_step(state, step)
      history.append(metrics)
      done = step + 1
      stop = received[0] if received else None  # read once: a later signal waits a step
      save_now = ckpt.should_save(done) or done == total_steps or stop is not None
      eval_now = evaluate is not None and eval_every > 0 and (
          done % eval_every == 0 or done == total_steps)
      if done % log_every == 0 or save_now or eval_now:
        summary = mean_metrics(history)
        history = []
        check_finite(summary, done, loss_keys)
        if eval_now:
          evaluated = evaluate(state, done)
          summary.update(evaluated)
        writer.write(done, summary)
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(summary.items())[:4]})
      if save_now:
        check_finite_state(state, done, loss_keys)
        checkpoints.save(ckpt, done, state, meta, force=True)
        now = time.time()
        add_wall_time(ckpt.directory, now - last_saved)
        last_saved = now
      bar.update(1)
      if stop is not None:
        writer.write(done, {STOPPED_KEY: 1.0})
        ckpt.wait_until_finished()
        raise signals.stop(name, stop, step=done)
  ckpt.wait_until_finished()
  if is_main_process():
    scores = "".join(f", {k} {v:.2f}%" for k, v in evaluated.items()
                     if k.endswith(top1.METRIC_SUFFIX))
    print(f"{name}: finished at step {total_steps} in {ckpt.directory} "
          f"({total_steps - start_step} steps this run in {time.time() - started:.0f} s"
          f"{scores})")
  return state
