"""This project against PyTorch eager on the same networks, shapes and threads, measured interleaved.

For every form ('cifar': 32x32, batch 128; 'imagenet': 224x224, batch 16),
architecture and width multiplier, each round runs scripts/torch_reference.py
(in the PyTorch environment, .venv-torch) and scripts/benchmark.py (here) once
each, one after the other, in an order that rotates from round to round
(`round_order`), both confined to the same N CPUs; the medians over the rounds and their ratio make
one row. Measuring in one sitting and interleaved is what makes the ratio mean
something on a machine whose speed drifts by tens of percent within minutes.

Before anything is timed, both sides count every setting's trainable parameters
and BatchNorm statistics; a network that differs is refused in one line.
"""
import csv
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from mobilenet import malloc_tuning
from mobilenet.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
TORCH_SCRIPT = ROOT / 'scripts' / 'torch_reference.py'
OUR_SCRIPT = ROOT / 'scripts' / 'benchmark.py'
OUR_PROFILE_SCRIPT = ROOT / 'scripts' / 'profile_step.py'
DEFAULT_TORCH_PYTHON = ROOT / '.venv-torch' / 'bin' / 'python'
SETUP_COMMAND = 'bash scripts/setup_torch_reference.sh'
ARCHITECTURES = ('mobilenet_v1', 'mobilenet_v2', 'mobilenet_v3_large', 'mobilenet_v3_small')


@dataclasses.dataclass(frozen=True)
class Form:
  """Input shape, batch and the config whose recipe (optimizer, decay, smoothing) both sides run."""
  config_file: str
  resolution: int
  batch_size: int


FORMS = {'cifar': Form('configs/cifar10.py', 32, 128),
         'imagenet': Form('configs/imagenet.py', 224, 16)}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the comparison."""
  form: str
  architecture: str
  width_multiplier: float

  @property
  def label(self) -> str:
    return f'{self.form} {self.architecture} {self.width_multiplier:g}'


def settings_grid(forms: Sequence[str], architectures: Sequence[str],
                  width_multipliers: Sequence[float]) -> List[Setting]:
  """Every combination, checked: an unknown form or architecture is one UserError."""
  for form in forms:
    if form not in FORMS:
      raise UserError(f'unknown form {form!r}; choose from {", ".join(FORMS)}')
  for architecture in architectures:
    if architecture not in ARCHITECTURES:
      raise UserError(f'architecture {architecture!r} has no PyTorch definition in '
                      f'scripts/torch_reference.py; choose from {", ".join(ARCHITECTURES)}')
  for width in width_multipliers:
    if width <= 0:
      raise UserError(f'width multiplier {width} must be > 0')
  return [Setting(*values) for values in itertools.product(forms, architectures, width_multipliers)]


def load_config(setting: Setting):
  """The form's config file at this setting's architecture and width."""
  path = ROOT / FORMS[setting.form].config_file
  spec = importlib.util.spec_from_file_location(f'mobilenet_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.name = setting.architecture
  config.model.width_multiplier = setting.width_multiplier
  config.model.resolution = FORMS[setting.form].resolution
  config.batch_size = FORMS[setting.form].batch_size
  config.model.dtype = 'float32'
  return config


def project_counts(setting: Setting) -> Dict[str, int]:
  """This project's trainable parameters and BatchNorm statistics (models/counting.py)."""
  from mobilenet.models import counting  # pylint: disable=g-import-not-at-top
  totals = counting.totals(counting.model_layer_specs(load_config(setting)))
  return {'params': totals.params, 'batch_stats': totals.batch_stats}


def torch_command(torch_python: pathlib.Path, setting: Setting, *, threads: int, warmup: int,
                  steps: int, counts_only: bool = False, profile: bool = False) -> List[str]:
  """scripts/torch_reference.py's command line for `setting`, with the config's recipe.

  `profile`: also its training step's milliseconds per kind of layer.
  """
  config = load_config(setting)
  command = [str(torch_python), str(TORCH_SCRIPT), '--architecture', setting.architecture,
             '--width_multiplier', str(setting.width_multiplier), '--form', config.model.form,
             '--resolution', str(config.model.resolution), '--batch_size', str(config.batch_size),
             '--num_classes', str(config.model.num_classes),
             '--activation', config.model.activation,
             '--min_channels', str(config.model.min_channels),
             '--dropout_rate', str(config.model.dropout_rate),
             '--optimizer', 'rmsprop' if config.optimizer.name == 'rmsprop' else 'sgd',
             '--learning_rate', str(config.optimizer.learning_rate),
             '--weight_decay', str(config.optimizer.weight_decay),
             '--label_smoothing', str(config.label_smoothing),
             '--threads', str(threads), '--warmup', str(warmup), '--steps', str(steps)]
  if config.optimizer.name not in ('sgd', 'rmsprop'):
    raise UserError(f'{FORMS[setting.form].config_file} uses optimizer {config.optimizer.name!r}, '
                    'which scripts/torch_reference.py does not have; use sgd or rmsprop')
  return command + (['--counts_only'] if counts_only else []) + (['--profile'] if profile else [])


def our_command(setting: Setting, *, warmup: int, steps: int) -> List[str]:
  """scripts/benchmark.py's command line for `setting`."""
  form = FORMS[setting.form]
  return [sys.executable, str(OUR_SCRIPT), '--config', str(ROOT / form.config_file),
          f'--architectures={setting.architecture}',
          f'--width_multipliers={setting.width_multiplier}', f'--batch_sizes={form.batch_size}',
          f'--resolutions={form.resolution}', '--dtypes=float32', f'--warmup={warmup}',
          f'--steps={steps}', '--json']


def our_profile_command(setting: Setting, *, warmup: int, steps: int) -> List[str]:
  """scripts/profile_step.py's command line for `setting`: our step's milliseconds per kind of layer."""
  form = FORMS[setting.form]
  return [sys.executable, str(OUR_PROFILE_SCRIPT), '--config', str(ROOT / form.config_file),
          f'--config.model.name={setting.architecture}',
          f'--config.model.width_multiplier={setting.width_multiplier}',
          f'--config.batch_size={form.batch_size}', f'--config.model.resolution={form.resolution}',
          '--config.model.dtype=float32', f'--warmup={warmup}', f'--steps={steps}', '--json']


def cpu_set(threads: int) -> List[int]:
  """The first `threads` CPUs this process may run on; UserError when there are fewer."""
  available = sorted(os.sched_getaffinity(0))
  if threads < 1 or threads > len(available):
    raise UserError(f'--threads={threads}: this machine lets the process use {len(available)} '
                    f'CPUs; pass --threads between 1 and {len(available)}')
  return available[:threads]


def run_json(command: Sequence[str], cpus: Sequence[int], what: str,
             environment: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """Runs `command` on `cpus` only, in `environment` (default this process's); returns the last
  JSON line it prints, or raises UserError."""
  environment = dict(os.environ if environment is None else environment,
                     OMP_NUM_THREADS=str(len(cpus)), PYTHONUNBUFFERED='1')
  result = subprocess.run(list(command), capture_output=True, text=True, cwd=ROOT, env=environment,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus), check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
  if result.returncode != 0 or not lines:
    reason = (result.stderr.strip().splitlines() or ['no output'])[-1]
    raise UserError(f'{what} failed (exit {result.returncode}): {reason}')
  return json.loads(lines[-1])


# PyTorch's side as its users run it ('torch': in the environment this command was given), and
# with the glibc malloc settings that this project's CLIs give themselves (malloc_tuning.py),
# which make PyTorch's training faster here too (docs/performance.md): 'torch_tuned'.
TORCH_MALLOC = {'as_installed': ('torch',), 'tuned': ('torch_tuned',),
                'both': ('torch', 'torch_tuned')}
SIDE_NAMES = {'torch': 'PyTorch', 'torch_tuned': 'PyTorch (tuned malloc)', 'ours': 'ours'}


def side_environment(side: str) -> Dict[str, str]:
  """The environment a side runs in: PyTorch's as given to this command, or with our malloc
  settings; ours as given (its scripts add the settings themselves)."""
  if side == 'torch':
    return malloc_tuning.untuned_environment()
  if side == 'torch_tuned':
    return malloc_tuning.tuned_environment(malloc_tuning.untuned_environment())
  return dict(os.environ)


def check_same_networks(setting: Setting, ours: Dict[str, int], theirs: Dict[str, Any]) -> None:
  """UserError unless both sides have the same parameters and BatchNorm statistics."""
  if (ours['params'], ours['batch_stats']) != (theirs['params'], theirs['batch_stats']):
    raise UserError(
        f'{setting.label}: PyTorch network has {theirs["params"]:,} parameters and '
        f'{theirs["batch_stats"]:,} BatchNorm statistics, this project\'s {ours["params"]:,} and '
        f'{ours["batch_stats"]:,}; refusing to compare different networks (fix '
        'scripts/torch_reference.py to match mobilenet/models/architectures.py)')


def summarize(setting: Setting, counts: Dict[str, int],
              measurements: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """One row from a setting's measurements (each {'side': a SIDE_NAMES key, 'round', ...}).

  Medians per side; `train_ratio` and `eval_ratio` are ours over PyTorch as installed,
  `*_ratio_vs_tuned` ours over PyTorch with the tuned malloc, for the sides measured.
  """
  row = {'form': setting.form, 'architecture': setting.architecture,
         'width_multiplier': setting.width_multiplier, **counts,
         'rounds': len({m['round'] for m in measurements})}
  sides = [side for side in SIDE_NAMES if any(m['side'] == side for m in measurements)]
  for side in sides:
    for metric in ('train_img_s', 'eval_img_s'):
      values = [m[metric] for m in measurements if m['side'] == side]
      row[f'{side}_{metric}'] = round(statistics.median(values), 1)
  for theirs, suffix in (('torch', ''), ('torch_tuned', '_vs_tuned')):
    if theirs in sides:
      for metric in ('train', 'eval'):
        row[f'{metric}_ratio{suffix}'] = round(
            row[f'ours_{metric}_img_s'] / row[f'{theirs}_{metric}_img_s'], 2)
  ours = [m for m in measurements if m['side'] == 'ours']
  row['ours_train_compile_s'] = round(statistics.median(m['train_compile_s'] for m in ours), 1)
  return row


TABLE_COLUMNS = (('form', 'form'), ('architecture', 'architecture'), ('α', 'width_multiplier'),
                 ('params', 'params'), ('PyTorch train', 'torch_train_img_s'),
                 ('PyTorch (tuned malloc) train', 'torch_tuned_train_img_s'),
                 ('ours train', 'ours_train_img_s'), ('train ratio', 'train_ratio'),
                 ('train ratio vs tuned', 'train_ratio_vs_tuned'),
                 ('PyTorch eval', 'torch_eval_img_s'),
                 ('PyTorch (tuned malloc) eval', 'torch_tuned_eval_img_s'),
                 ('ours eval', 'ours_eval_img_s'), ('eval ratio', 'eval_ratio'),
                 ('eval ratio vs tuned', 'eval_ratio_vs_tuned'),
                 ('our train compile s', 'ours_train_compile_s'))


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
  """Markdown: images/second of each side measured (medians over rounds), ours / PyTorch."""
  columns = [(title, key) for title, key in TABLE_COLUMNS if key in rows[0]]
  lines = ['| ' + ' | '.join(title for title, _ in columns) + ' |',
           '|---|---|' + '---:|' * (len(columns) - 2)]
  for row in rows:
    cells = []
    for _, key in columns:
      value = row[key]
      if '_ratio' in key:
        cells.append(f'{value:.2f}x')
      elif isinstance(value, (int, float)) and key != 'width_multiplier':
        cells.append(f'{value:,}')
      else:
        cells.append(str(value))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


PROFILE_KINDS = ('pointwise', 'depthwise', 'batch_norm_activation', 'squeeze_excite', 'standard',
                 'dense', 'residual_and_glue', 'loss_optimizer_other')


def profile_row(setting: Setting, theirs: Dict[str, Any], ours: Dict[str, Any]) -> Dict[str, Any]:
  """Both sides' training-step milliseconds per kind of layer (each side's own profiler).

  `theirs`: torch_reference.py --profile's line; `ours`: profile_step.py --json's. The steps'
  times are each side's profiled steps' (PyTorch's profiler slows its many small operations).
  """
  our_ms = {row['kind']: row['ms_per_step'] for row in ours['kinds']}
  row = {'form': setting.form, 'architecture': setting.architecture,
         'width_multiplier': setting.width_multiplier,
         'torch_step_ms': theirs['profile_ms_per_step']['step'], 'ours_step_ms': ours['step_ms']}
  for kind in PROFILE_KINDS:
    row[f'torch_{kind}_ms'] = theirs['profile_ms_per_step'].get(kind, 0.0)
    row[f'ours_{kind}_ms'] = our_ms.get(kind, 0.0)
  return row


def format_profile_table(rows: Sequence[Dict[str, Any]]) -> str:
  """Markdown: per kind of layer, PyTorch's / our milliseconds per training step."""
  titles = ['form', 'architecture', 'α', 'step'] + [kind.replace('_', ' ') for kind in PROFILE_KINDS]
  lines = ['| ' + ' | '.join(titles) + ' |', '|---|---|' + '---:|' * (len(titles) - 2)]
  for row in rows:
    cells = [row['form'], row['architecture'], str(row['width_multiplier']),
             f"{row['torch_step_ms']:,.0f} / {row['ours_step_ms']:,.0f}"]
    cells += [f"{row[f'torch_{kind}_ms']:,.1f} / {row[f'ours_{kind}_ms']:,.1f}"
              for kind in PROFILE_KINDS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def machine_description(threads: int, torch_framework: Optional[str]) -> Dict[str, Any]:
  """What the numbers were measured on: CPU model, cores, threads, versions, time."""
  import jax  # pylint: disable=g-import-not-at-top
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      model = next((line.split(':', 1)[1].strip() for line in cpuinfo
                    if line.startswith('model name')), model)
  except OSError:
    pass
  return {'cpu': model, 'cpus': os.cpu_count(), 'threads': threads, 'torch': torch_framework,
          'jax': jax.__version__, 'utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds')}


def write_results(output: pathlib.Path, machine: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                  measurements: Sequence[Dict[str, Any]],
                  profiles: Sequence[Dict[str, Any]] = ()) -> List[pathlib.Path]:
  """`output`.csv (the table's rows) and `output`.json (machine, rows, every measurement and
  the per-kind profiles, when taken)."""
  output.parent.mkdir(parents=True, exist_ok=True)
  csv_path, json_path = output.with_suffix('.csv'), output.with_suffix('.json')
  with open(csv_path, 'w', newline='') as file:
    writer = csv.DictWriter(file, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  json_path.write_text(json.dumps({'machine': machine, 'rows': list(rows),
                                   'measurements': list(measurements),
                                   'profiles': list(profiles)}, indent=1) + '\n')
  return [csv_path, json_path]


def round_order(sides: Sequence[str], round_index: int) -> List[str]:
  """The order the sides are measured in, in round `round_index`: rotated by one side per round.

  Every side takes every place in turn, so a slow stretch of this machine falls on different sides
  in different rounds. Reversing the order every other round (which cancels a linear drift
  exactly) measured the last side twice back to back, and one slow minute then set that side's
  median (docs/performance.md, fifteenth round); with three sides, rotated, no side is measured
  twice in a row.
  """
  shift = round_index % len(sides)
  return [*sides[shift:], *sides[:shift]]


def compare(settings: Sequence[Setting], *, threads: int = 2, rounds: int = 3, warmup: int = 2,
            steps: int = 10, torch_python: pathlib.Path = DEFAULT_TORCH_PYTHON,
            output: Optional[pathlib.Path] = None, profile: bool = False,
            torch_malloc: str = 'as_installed',
            log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
  """Measures every setting on both sides, interleaved; logs the table and returns its rows.

  `profile`: after a setting's rounds, profile one training step run of each side and log
  (and write) both sides' milliseconds per kind of layer (PyTorch as installed: its profiler
  runs many times slower under the tuned malloc). `torch_malloc`: a key of TORCH_MALLOC.
  """
  if torch_malloc not in TORCH_MALLOC:
    raise UserError(f'--torch_malloc={torch_malloc}: choose from {", ".join(TORCH_MALLOC)}')
  if not pathlib.Path(torch_python).exists():
    raise UserError(f'no PyTorch environment at {torch_python}; create it with: {SETUP_COMMAND}')
  if rounds < 1 or steps < 1 or warmup < 0:
    raise UserError(f'--rounds={rounds}, --steps={steps}, --warmup={warmup}: rounds and steps '
                    'must be >= 1 and warmup >= 0')
  cpus = cpu_set(threads)
  log(f'checking that both sides build the same networks ({len(settings)} settings) ...')
  counts, torch_framework = {}, None
  for setting in settings:
    counts[setting] = project_counts(setting)
    theirs = run_json(torch_command(torch_python, setting, threads=threads, warmup=0, steps=1,
                                    counts_only=True), cpus, f'{setting.label}: PyTorch counts',
                      side_environment('torch'))
    check_same_networks(setting, counts[setting], theirs)
    torch_framework = theirs['framework']
    log(f'  {setting.label}: {theirs["params"]:,} parameters and {theirs["batch_stats"]:,} '
        'BatchNorm statistics on both sides')
  machine = {**machine_description(threads, torch_framework), 'torch_malloc': torch_malloc}
  log(f'{machine["cpu"]}, {machine["cpus"]} CPUs, both sides on CPUs {cpus}; '
      f'{torch_framework} vs jax {machine["jax"]}; {rounds} rounds of {warmup} warm-up + '
      f'{steps} timed steps per side and setting')
  all_sides = (*TORCH_MALLOC[torch_malloc], 'ours')
  rows, measurements, profiles, total = [], [], [], len(settings) * rounds * len(all_sides)
  started = time.perf_counter()
  for setting in settings:
    mine = []
    for round_index in range(rounds):
      for side in round_order(all_sides, round_index):
        if side == 'ours':
          command = our_command(setting, warmup=warmup, steps=steps)
        else:
          command = torch_command(torch_python, setting, threads=threads, warmup=warmup,
                                  steps=steps)
        start = time.perf_counter()
        result = run_json(command, cpus, f'{setting.label}: {side} round {round_index + 1}',
                          side_environment(side))
        if side == 'ours':
          check_same_networks(setting, counts[setting], result)
        measurement = {'side': side, 'round': round_index + 1, 'form': setting.form,
                       'architecture': setting.architecture,
                       'width_multiplier': setting.width_multiplier, **result}
        mine.append(measurement)
        measurements.append(measurement)
        name = SIDE_NAMES[side]
        log(f'[{len(measurements)}/{total}, {time.perf_counter() - started:.0f} s] {setting.label} '
            f'round {round_index + 1} {name}: train {result["train_img_s"]:,} '
            f'eval {result["eval_img_s"]:,} img/s ({time.perf_counter() - start:.0f} s)')
    rows.append(summarize(setting, counts[setting], mine))
    if profile:
      start = time.perf_counter()
      theirs = run_json(torch_command(torch_python, setting, threads=threads, warmup=warmup,
                                      steps=steps, profile=True), cpus,
                        f'{setting.label}: PyTorch profile', side_environment('torch'))
      ours = run_json(our_profile_command(setting, warmup=warmup, steps=steps), cpus,
                      f'{setting.label}: our profile')
      profiles.append(profile_row(setting, theirs, ours))
      log(f'{setting.label}: profiled both sides ({time.perf_counter() - start:.0f} s)')
  log('\n' + format_table(rows))
  if profiles:
    log('\nTraining step, milliseconds per kind of layer, PyTorch / ours (each side\'s profiler; '
        'PyTorch\'s operations run one at a time, ours may overlap on the two threads):\n'
        + format_profile_table(profiles))
  if output is not None:
    for path in write_results(pathlib.Path(output), machine, rows, measurements, profiles):
      log(f'wrote {path}')
  return rows
