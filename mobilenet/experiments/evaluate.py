"""Evaluates finished (or unfinished) runs and compares them: accuracy against size and cost.

`evaluate_runs(workdirs, output_dir)` reads each workdir's config.json,
restores its newest readable checkpoint (the EMA weights when the run kept
them), evaluates top-1 and top-5 on the whole test split with the trainer's
`train.evaluate`, and writes, in `output_dir`: results.csv, results.jsonl,
accuracy_vs_params.png, accuracy_vs_mult_adds.png (the paper's Figures 4-5)
and TensorBoard scalars with the parameter / mult-add count as the step. It
returns the Markdown table, sorted by parameters. Runs with an exported model
in their folder (scripts/export.py: *.tflite, *.onnx), or every run with
`latency=True`, also get the single-image latency of that model
(export/latency.py) in latency_ms columns and accuracy_vs_latency.png. A
workdir without a config or a checkpoint, or one that fails, becomes a row
saying so. Workdirs and the output folder may be local or on an object store
(gs://bucket/runs/*).
"""
import csv
import dataclasses
import functools
import glob
import io
import json
import math
import os
import posixpath
import re
import tempfile

import jax
import ml_collections
from absl import logging
from etils import epath

from mobilenet.training import checkpointing, config_base, optim, parallel, storage, train
from mobilenet.models import counting
from mobilenet.errors import UserError
from mobilenet.models import fused_inference
from mobilenet.models.mobilenet import create_model
from mobilenet.training.train_step import create_train_state, eval_step

# Orbax names a finished checkpoint by its step; unfinished ones carry a temporary suffix.
_STEP_FOLDER = re.compile(r'^\d+$')


@dataclasses.dataclass
class RunResult:
  """One row of the comparison: what the run is, how big, how accurate."""
  workdir: str
  status: str = 'ok'  # 'ok', or why the run has no accuracy.
  architecture: str | None = None
  width_multiplier: float | None = None
  resolution: int | None = None
  conv_type: str | None = None
  params: int | None = None
  mult_adds: int | None = None
  step: int | None = None
  ema: bool | None = None
  top1: float | None = None
  top5: float | None = None
  loss: float | None = None
  examples: int | None = None
  latency_model: str | None = None  # The exported file timed (export/latency.py).
  latency_ms: float | None = None  # Median single-image latency, 1 thread.
  latency_ms_all_threads: float | None = None  # The same on all cores.


FIELDS = [field.name for field in dataclasses.fields(RunResult)]


def _looks_like_run(path: str) -> bool:
  return ((epath.Path(path) / train.CONFIG_FILE).is_file()
          or (epath.Path(path) / 'checkpoints').is_dir())


def _glob(pattern: str) -> list[str]:
  """glob.glob, for gs://bucket/runs/* too (through epath: the folder before the first
  wildcard, globbed with the rest)."""
  if storage.is_local(pattern) or not glob.has_magic(pattern):
    return glob.glob(pattern)
  parts = pattern.split('/')
  first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  return [str(path) for path in epath.Path('/'.join(parts[:first])).glob('/'.join(parts[first:]))]


def expand_workdirs(patterns: list[str]) -> list[str]:
  """Workdirs from paths or globs, in order.

  A glob keeps only run folders (with config.json or checkpoints/), so that
  'runs/sweep/*' skips the comparison's own outputs there; a plain path, or a
  glob matching nothing, stays as given, to be reported.
  """
  workdirs = []
  for pattern in patterns:
    matches = sorted(path for path in _glob(pattern) if _looks_like_run(path))
    if not glob.has_magic(pattern):
      matches = [pattern]
    for path in matches or [pattern]:
      if path not in workdirs:
        workdirs.append(path)
  return workdirs


def default_output_dir(workdirs: list[str]) -> str:
  """The folder the workdirs share: a sweep's folder for its variants."""
  if workdirs and not any(storage.is_local(path) for path in workdirs):
    # URLs: os.path would fold gs:// into gs:/; the common parent of what follows the scheme.
    schemes = {path.split('://', 1)[0] for path in workdirs}
    rests = [posixpath.dirname(path.split('://', 1)[1].rstrip('/')) for path in workdirs]
    if len(schemes) == 1:
      return f'{schemes.pop()}://{posixpath.commonpath(rests)}'
  parents = [os.path.dirname(os.path.abspath(path)) for path in workdirs]
  return os.path.commonpath(parents) if parents else '.'


def load_run_config(workdir: str | epath.Path) -> ml_collections.ConfigDict | None:
  """The config a run recorded in config.json, or None when there is none.

  Fields added to the schema since the run was recorded take their defaults.
  """
  path = epath.Path(workdir) / train.CONFIG_FILE
  if not path.is_file():
    return None
  return ml_collections.ConfigDict(config_base.with_defaults(json.loads(path.read_text())))


def latest_checkpoint_step(workdir: str | epath.Path) -> int | None:
  """The newest finished checkpoint's step, from the folder names alone (no Orbax, no TF)."""
  folder = epath.Path(workdir) / 'checkpoints'
  if not folder.is_dir():
    return None
  steps = [int(path.name) for path in folder.iterdir()
           if path.is_dir() and _STEP_FOLDER.match(path.name)]
  return max(steps, default=None)


def abstract_train_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                         steps_per_epoch: int, sharding) -> tuple:
  """(model, abstract TrainState) of a run, built as train.py builds them, without computing.

  Steps per epoch only shape the learning-rate schedule, never the state, but
  they are passed through so the optimizer is exactly the trainer's.
  """
  model = create_model(config.model)
  num_steps = train.total_train_steps(config, steps_per_epoch)
  tx = optim.create_optimizer(
      config, optim.learning_rate_schedule(config, steps_per_epoch, num_steps))
  shapes = jax.eval_shape(functools.partial(create_train_state, model, tx, config, image_shape))
  return model, checkpointing.abstract_like(shapes, sharding)


def _describe(result: RunResult, config: ml_collections.ConfigDict) -> None:
  """Fills in what the config alone tells: the variant and its counts."""
  result.architecture = config.model.name
  result.width_multiplier = float(config.model.width_multiplier)
  result.resolution = int(config.model.resolution)
  result.conv_type = config.model.conv_type
  counts = counting.totals(counting.model_layer_specs(config))
  result.params, result.mult_adds = counts.params, counts.mult_adds


def evaluate_run(workdir: str, mesh, data_dir: str | None = None) -> RunResult:
  """One run's row; problems a user can fix become its status instead of an exception."""
  result = RunResult(workdir=workdir)
  if not epath.Path(workdir).is_dir():
    result.status = 'no such folder'
    return result
  config = load_run_config(workdir)
  if config is None:
    result.status = f'no {train.CONFIG_FILE}'
    return result
  if data_dir:
    config.data_dir = data_dir
  _describe(result, config)
  if latest_checkpoint_step(workdir) is None:  # Checked first: opening Orbax is slow.
    result.status = 'no checkpoint'
    return result
  from mobilenet.data import input_pipeline  # TensorFlow is imported with the data, not before.
  input_pipeline.ensure_available(config)
  info = input_pipeline.get_dataset_info(config)
  replicated = parallel.replicated(mesh)
  model, abstract = abstract_train_state(config, info.image_shape,
                                         input_pipeline.steps_per_epoch(config), replicated)
  state = checkpointing.Checkpoints(epath.Path(workdir) / 'checkpoints',
                                    read_only=True).restore_latest(abstract)
  if state is None:
    result.status = 'no checkpoint'
    return result
  result.step, result.ema = int(state.step), config.ema_decay > 0
  apply_fn, _ = fused_inference.eval_apply(model, config.model.fused_inference)
  eval_fn = jax.jit(parallel.on_mesh(mesh, functools.partial(eval_step, apply_fn=apply_fn,
                                                             config=config, use_ema=result.ema)),
                    in_shardings=(replicated, parallel.batch_sharding(mesh)),
                    out_shardings=replicated)
  scores = train.evaluate(state, eval_fn, config, parallel.batch_sharding(mesh))
  result.examples = int(scores['examples'])
  if not math.isfinite(scores['loss']):  # NaN is not JSON, and its accuracy is chance.
    result.status = 'diverged: the eval loss is NaN or infinite'
    return result
  result.top1, result.top5, result.loss = scores['top1'], scores['top5'], scores['loss']
  return result


def exported_model(workdir: str) -> str | None:
  """The exported model to time in a run folder: model.tflite, else the first float .tflite / .onnx."""
  candidates = [os.path.join(workdir, 'model.tflite')] + sorted(
      path for pattern in ('*.tflite', '*.onnx') for path in glob.glob(os.path.join(workdir, pattern))
      if 'int8' not in os.path.basename(path))
  return next((path for path in candidates if os.path.isfile(path)), None)


def measure_latency(result: RunResult, always: bool) -> None:
  """Times the run's exported model; with `always`, exports a float .tflite to time when there is none."""
  from mobilenet.export import export_run, latency  # pylint: disable=import-outside-toplevel
  path = exported_model(result.workdir)
  with tempfile.TemporaryDirectory() as folder:
    if path is None and always:
      path = os.path.join(folder, 'model.tflite')  # Not in the run folder: eval writes none there.
      export_run.export_run(result.workdir, path, 'tflite')
    if path is None:
      return
    one, *more = latency.measure(path)
  result.latency_model = path if os.path.dirname(path) != folder else 'model.tflite (exported by eval)'
  result.latency_ms = one.median_ms
  result.latency_ms_all_threads = more[-1].median_ms if more else one.median_ms


def _sort_key(result: RunResult):
  """By parameters, then mult-adds; rows without counts last."""
  return (result.params is None, result.params or 0, result.mult_adds or 0, result.workdir)


def _percent(value: float | None) -> str:
  return '' if value is None else f'{100 * value:.2f}'


def _number(value: int | None) -> str:
  return '' if value is None else f'{value:,}'


def format_table(results: list[RunResult]) -> str:
  """A Markdown table of the runs, sorted by parameters (with latency columns when any was timed)."""
  timed = any(r.latency_ms is not None for r in results)
  lines = ['| run | architecture | alpha | resolution | conv | params | mult-adds | step '
           '| top-1 % | top-5 % |' + (' latency ms (1 thread) | latency ms (all cores) |' if timed
                                      else '') + ' status |',
           '|---|---|---:|---:|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if timed else '')
           + '---|']
  for r in sorted(results, key=_sort_key):
    latency = (f'| {_milliseconds(r.latency_ms)} | {_milliseconds(r.latency_ms_all_threads)} '
               if timed else '')
    lines.append(
        f'| {os.path.basename(os.path.normpath(r.workdir))} | {r.architecture or ""} '
        f'| {"" if r.width_multiplier is None else r.width_multiplier} '
        f'| {"" if r.resolution is None else r.resolution} | {r.conv_type or ""} '
        f'| {_number(r.params)} | {_number(r.mult_adds)} | {_number(r.step)} '
        f'| {_percent(r.top1)} | {_percent(r.top5)} {latency}| {r.status} |')
  return '\n'.join(lines)


def _milliseconds(value: float | None) -> str:
  return '' if value is None else f'{value:.3f}'


def write_records(results: list[RunResult], output_dir: epath.Path) -> None:
  """results.csv and results.jsonl, one row per run, sorted by parameters."""
  rows = [dataclasses.asdict(r) for r in sorted(results, key=_sort_key)]
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=FIELDS)
  writer.writeheader()
  writer.writerows(rows)
  (output_dir / 'results.csv').write_text(table.getvalue(), encoding='utf-8')
  (output_dir / 'results.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows),
                                            encoding='utf-8')


def point_labels(results: list[RunResult]) -> list[str]:
  """'alpha 0.5', plus the resolution and conv type when the runs differ in them."""
  show_resolution = len({r.resolution for r in results}) > 1
  show_conv = len({r.conv_type for r in results}) > 1
  labels = []
  for r in results:
    parts = [f'α {r.width_multiplier:g}']
    if show_resolution:
      parts.append(f'{r.resolution}px')
    if show_conv:
      parts.append(r.conv_type)
    labels.append(', '.join(parts))
  return labels


def series_by_architecture(results: list[RunResult], x_field: str) -> dict[str, list[RunResult]]:
  """The runs grouped by architecture (sorted by name), each group in order of `x_field`."""
  names = sorted({r.architecture or 'unknown' for r in results})
  return {name: sorted((r for r in results if (r.architecture or 'unknown') == name),
                       key=lambda r: getattr(r, x_field)) for name in names}


def plot_accuracy(results: list[RunResult], x_field: str, x_label: str,
                  path: epath.Path) -> None:
  """Top-1 against `x_field` on a log axis, one labelled point per run (V1's Figures 4-5).

  One series (colour and line, in order of the x values) per architecture, as
  in the figures the V2 and V3 papers open with.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')  # Files only: no display on servers.
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  figure, axes = pyplot.subplots(figsize=(6, 4.5))
  labels = dict(zip(map(id, results), point_labels(results)))
  all_series = series_by_architecture(results, x_field)
  for architecture, series in all_series.items():
    xs = [getattr(r, x_field) for r in series]
    ys = [100 * r.top1 for r in series]
    axes.plot(xs, ys, marker='o', linestyle='-' if len(series) > 1 else 'none',
              label=architecture)
    for x, y, r in zip(xs, ys, series):
      axes.annotate(labels[id(r)], (x, y), textcoords='offset points', xytext=(4, 4), fontsize=8)
  if len(all_series) > 1:
    axes.legend(fontsize=8, loc='best')
  axes.set_xscale('log')
  # A span under a decade gets a label on every minor tick, and they overlap.
  axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axes.margins(x=0.15, y=0.1)  # Room for the labels of the outermost points.
  axes.set_xlabel(x_label)
  axes.set_ylabel('test top-1 accuracy (%)')
  axes.grid(True, which='both', alpha=0.3)
  figure.tight_layout()
  image = io.BytesIO()
  figure.savefig(image, format='png', dpi=120)  # Then written through epath: gs:// too.
  pyplot.close(figure)
  epath.Path(path).write_bytes(image.getvalue())


def write_tensorboard(results: list[RunResult], output_dir: epath.Path) -> None:
  """Top-1 and top-5 with the parameter (and mult-add) count as the step, one point per run."""
  from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
  writer = tensorboard.SummaryWriter(str(output_dir / 'tensorboard'))
  for r in sorted(results, key=_sort_key):
    for metric in ('top1', 'top5'):
      writer.scalar(f'accuracy_vs_params/{metric}', getattr(r, metric), r.params)
      writer.scalar(f'accuracy_vs_mult_adds/{metric}', getattr(r, metric), r.mult_adds)
  writer.close()


def evaluate_runs(workdirs: list[str], output_dir: str | None = None,
                  data_dir: str | None = None, latency: bool = False) -> tuple[str, list[RunResult]]:
  """Evaluates every workdir (paths or globs), writes the outputs; returns (table, results).

  With `latency`, runs without an exported model get one (a float .tflite in a
  temporary folder) to time; runs with one are timed either way.
  """
  workdirs = expand_workdirs(workdirs)
  if not workdirs:
    raise UserError('no workdirs given; pass --workdir runs/a [runs/b ...] or a glob')
  output = epath.Path(output_dir or default_output_dir(workdirs))
  if output_dir is None and not output.is_dir():
    # A typo'd --workdir must not create folders: only an explicit --output is created.
    raise UserError(f'--workdir {workdirs[0]}: no such folder (and so no {output} to write the '
                    'results to); check the path, or pass --output <folder>')
  output.mkdir(parents=True, exist_ok=True)
  mesh = parallel.create_mesh()
  results = []
  for index, workdir in enumerate(workdirs, 1):
    logging.info('evaluating %d/%d: %s', index, len(workdirs), workdir)
    try:
      result = evaluate_run(workdir, mesh, data_dir)
      if result.top1 is not None:
        try:
          measure_latency(result, always=latency)
        except Exception as error:  # The accuracy stands without the timing.
          logging.exception('timing the exported model of %s failed', workdir)
          result.status = f'ok; no latency: {type(error).__name__}: {" ".join(str(error).split())[:200]}'
    except UserError as error:
      result = RunResult(workdir=workdir, status=f'error: {error}')
    except Exception as error:  # One broken run must not cost the others their rows.
      logging.exception('evaluating %s failed', workdir)
      first_line = ' '.join(str(error).split())[:200]
      result = RunResult(workdir=workdir, status=f'error: {type(error).__name__}: {first_line}')
    results.append(result)
    logging.info('%s: %s', workdir, result.status if result.top1 is None else
                 f'top-1 {result.top1:.4f} top-5 {result.top5:.4f} at step {result.step}')
  write_records(results, output)
  evaluated = [r for r in results if r.top1 is not None]
  if evaluated:
    plot_accuracy(evaluated, 'params', 'parameters', output / 'accuracy_vs_params.png')
    plot_accuracy(evaluated, 'mult_adds', 'mult-adds per example',
                  output / 'accuracy_vs_mult_adds.png')
    timed = [r for r in evaluated if r.latency_ms is not None]
    if timed:
      plot_accuracy(timed, 'latency_ms', 'single-image latency (ms, 1 thread, exported model)',
                    output / 'accuracy_vs_latency.png')
    write_tensorboard(evaluated, output)
  return format_table(results), results
