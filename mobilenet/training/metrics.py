"""Where metrics go: <workdir>/metrics.jsonl, TensorBoard event files, the console.

Only process 0 writes; every record carries `step`.
"""
import json
import pathlib
import sys
import time

import jax
from absl import logging


class MetricWriter:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._summary = None
    if not self._active:
      return
    workdir = pathlib.Path(workdir)
    self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
    if tensorboard:
      # Imported here: TensorFlow is only needed by a writer that is used.
      from flax.metrics import tensorboard as flax_tensorboard
      self._summary = flax_tensorboard.SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    """Records scalars of one split ('train', 'eval', 'model') at a step."""
    if not self._active:
      return
    record = {'step': int(step), 'split': split, 'time': time.time(),
              **{key: float(value) for key, value in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._summary is not None:
      for key, value in scalars.items():
        self._summary.scalar(f'{split}/{key}', float(value), int(step))
      self._summary.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._summary is not None:
      self._summary.close()


class Progress:
  """A progress bar with rate and ETA on a terminal; plain periodic log lines otherwise."""

  def __init__(self, total_steps: int, initial_step: int, batch_size: int):
    self._total = total_steps
    self._batch_size = batch_size
    self._bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      import tqdm  # Imported here: only a terminal needs it.
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step',
                            dynamic_ncols=True, smoothing=0.1)
    self._last_step = initial_step
    self._report_step = initial_step
    self._report_time = time.perf_counter()

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (cheap: call every step)."""
    if self._bar is not None:
      self._bar.update(step - self._last_step)
    self._last_step = step

  def report(self, step: int, summary: str) -> None:
    """Shows the latest metrics: on the bar, or as one log line with rate and ETA."""
    self.advance(step)
    if self._bar is not None:
      self._bar.set_postfix_str(summary, refresh=True)
    elif jax.process_index() == 0:
      now = time.perf_counter()  # The rate since the last report: compiling is not in it.
      elapsed = now - self._report_time
      rate = (step - self._report_step) / elapsed if elapsed > 0 else 0.0
      self._report_time, self._report_step = now, step
      eta = (self._total - step) / rate if rate > 0 else float('nan')
      logging.info('step %d/%d (%.0f%%) %.1f steps/s, %.0f img/s, ETA %s | %s', step, self._total,
                   100 * step / self._total, rate, rate * self._batch_size,
                   format_seconds(eta), summary)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def format_seconds(seconds: float) -> str:
  """'1h02m03s' style durations; '?' when unknown."""
  if seconds != seconds or seconds == float('inf'):
    return '?'
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'
