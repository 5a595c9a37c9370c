"""Where metrics go: <workdir>/metrics.jsonl, TensorBoard event files, the console.

Only process 0 writes; every record carries `step`. The console gets a progress
bar (or log lines), a line before and after each slow first call (compiling),
and one summary at the end of a run.
"""
import contextlib
import json
import os
import pathlib
import sys
import time

import jax
from absl import logging
from etils import epath

from mobilenet.training import storage


class MetricWriter:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._summary = None
    if not self._active:
      return
    workdir = epath.Path(workdir)
    # On gs:// each flush uploads the file again (an object cannot be appended to): metrics.jsonl
    # stays small, and a killed run keeps the rows up to its last flush, as on a disk. epath
    # opens a gs:// file as a context manager only: the stack keeps it open until close().
    self._files = contextlib.ExitStack()
    self._jsonl = self._files.enter_context((workdir / 'metrics.jsonl').open('a'))
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
      self._files.close()
    if self._summary is not None:
      self._summary.close()


# Narrower than this, a bar with its metrics wraps and redraws as new lines;
# a terminal that reports 0 columns (some containers, CI) draws no bar at all.
MIN_BAR_COLUMNS = 60


def terminal_columns() -> int:
  """The width of the terminal on stderr; 0 when it is not one or reports none."""
  try:
    return os.get_terminal_size(sys.stderr.fileno()).columns
  except (OSError, ValueError):
    return 0


class Progress:
  """A progress bar with rate and ETA on a terminal; plain periodic log lines otherwise.

  The rate counts training only: it starts after the first step (compiling)
  and leaves out what runs inside `paused()` (eval).
  """

  def __init__(self, total_steps: int, initial_step: int, batch_size: int):
    self._total = total_steps
    self._batch_size = batch_size
    self._active = jax.process_index() == 0
    self._use_bar = (self._active and sys.stderr.isatty()
                     and terminal_columns() >= MIN_BAR_COLUMNS)
    self._bar = None
    self._last_step = initial_step
    self._report_step = initial_step
    self._report_time = None  # Set by the first advance, once the first step is compiled.

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (cheap: call every step)."""
    if self._report_time is None:
      self._report_time, self._report_step = time.perf_counter(), step
      if self._use_bar:
        import tqdm  # Imported here: only a terminal needs it.
        self._bar = tqdm.tqdm(total=self._total, initial=step, unit='step', dynamic_ncols=True,
                              smoothing=0.1, file=sys.stderr)
    elif self._bar is not None:
      self._bar.update(step - self._last_step)
    self._last_step = step

  @contextlib.contextmanager
  def paused(self, pending=None):
    """Leaves the time spent inside out of the rate and ETA (for eval).

    `pending`: arrays of the training steps dispatched so far (the state),
    waited for first, since they run asynchronously: their time is training's.
    """
    if pending is not None:
      jax.block_until_ready(pending)
    start = time.perf_counter()
    if self._bar is not None:
      self._bar.clear()  # So that log lines written meanwhile start on a line of their own.
    try:
      yield
    finally:
      if self._report_time is not None:
        self._report_time += time.perf_counter() - start
      if self._bar is not None:
        self._bar.unpause()
        self._bar.refresh()

  def report(self, step: int, summary: str) -> None:
    """Shows the latest metrics: on the bar, or as one log line with rate and ETA."""
    self.advance(step)
    if self._bar is not None:
      self._bar.set_postfix_str(summary, refresh=True)
    elif self._active:
      now = time.perf_counter()  # The rate since the last report.
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


def log_first_call(fn, what: str, expected: str):
  """Wraps `fn` (a jitted function) to log before and after its first call.

  The first call traces and compiles, which takes from seconds to minutes
  with nothing to show; after it, this waits for the result, so the log also
  says how long the first run took.
  """
  called = False

  def wrapped(*args, **kwargs):
    nonlocal called
    if called:
      return fn(*args, **kwargs)
    called = True
    if jax.process_index() == 0:
      logging.info('Compiling %s (%s)...', what, expected)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    compiled = time.perf_counter()
    jax.block_until_ready(result)
    if jax.process_index() == 0:
      logging.info('Compiled %s in %.1f s; its first run took %.2f s', what, compiled - start,
                   time.perf_counter() - compiled)
    return result

  return wrapped


def compile_ahead(jitted, args: tuple, what: str, expected: str):
  """`jitted` lowered and compiled for `args` (arrays or jax.ShapeDtypeStructs), logged.

  For a step whose inputs are not there yet (the first batch while the data
  decodes): compiling now overlaps the wait. The result takes arrays of
  exactly those shapes, dtypes and shardings.
  """
  if jax.process_index() == 0:
    logging.info('Compiling %s (%s)...', what, expected)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  if jax.process_index() == 0:
    logging.info('Compiled %s in %.1f s', what, time.perf_counter() - start)
  return compiled


def seconds_since_process_start() -> float | None:
  """Seconds since this process was created (Linux's /proc; None elsewhere).

  The process, not the interpreter: the CLIs re-execute themselves once for
  the malloc settings (malloc_tuning.py), which keeps the process and its
  start time, so this is the time since the command was typed.
  """
  try:
    with open('/proc/self/stat') as stat:
      # Field 22, counted after the command name (which may hold spaces) closes with ')'.
      start_ticks = int(stat.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as uptime:
      return float(uptime.read().split()[0]) - start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return None


def log_start_up(first_step_result) -> None:
  """Waits for the process's first training step and logs how long the command took to it."""
  jax.block_until_ready(first_step_result)
  age = seconds_since_process_start()
  if age is not None and jax.process_index() == 0:
    logging.info('First training step done %.1f s after the command started', age)


def _shown_path(path: str | pathlib.Path) -> str:
  """`path` relative to the current folder when it is inside it (shorter to copy)."""
  if not storage.is_local(path):
    return str(path)
  path = pathlib.Path(path).absolute()
  try:
    return str(path.relative_to(pathlib.Path.cwd()))
  except ValueError:
    return str(path)


def _interpreter() -> str:
  """How to call this Python again: the virtual environment's, else python3."""
  return _shown_path(sys.executable) if sys.prefix != sys.base_prefix else 'python3'


def run_summary(workdir: str | pathlib.Path, results: dict[str, float], wall_seconds: float,
                start_step: int, num_steps: int) -> str:
  """The lines that end a run: accuracy, size, time, where its outputs are, what to run next."""
  workdir = _shown_path(workdir)
  scripts = _shown_path(pathlib.Path(__file__).parents[2] / 'scripts')
  python = _interpreter()
  tensorboard = (os.path.join(os.path.dirname(python), 'tensorboard') if python != 'python3'
                 else 'tensorboard')
  resumed = f', resumed at step {start_step:,}' if start_step else ''
  return '\n'.join([
      f'Run finished: test top-1 {100 * results["top1"]:.2f}%, top-5 {100 * results["top5"]:.2f}% '
      f'on {int(results["examples"]):,} examples after {num_steps:,} steps; '
      f'{int(results["params"]):,} parameters, {int(results["mult_adds"]):,} mult-adds per '
      f'image; wall time {format_seconds(wall_seconds)}{resumed}.',
      f'  checkpoints  {os.path.join(workdir, "checkpoints")}',
      f'  metrics      {os.path.join(workdir, "metrics.jsonl")} (one JSON object per line)',
      f'  TensorBoard  {tensorboard} --logdir {os.path.join(workdir, "tensorboard")}',
      f'  next         {python} {os.path.join(scripts, "eval.py")} --workdir {workdir}'
      '   # accuracy table, CSV and plots vs parameters and mult-adds',
  ])


def format_seconds(seconds: float) -> str:
  """'1h02m03s' style durations; '?' when unknown."""
  if seconds != seconds or seconds == float('inf'):
    return '?'
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'
