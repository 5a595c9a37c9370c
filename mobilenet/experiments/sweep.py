"""Grid sweeps: one training subprocess per variant, then one comparison of them all.

A sweep is a config file, fixed overrides, and axes such as
`model.width_multiplier=0.25,0.5,0.75,1.0`; several axes give their product.
Each variant trains in `<sweep folder>/<name>`, named after its overrides
(`width_multiplier=0.25,resolution=28`), through scripts/train.py in its own
process, so a crash or a leaked resource stays in that variant. Rerunning the
sweep skips finished variants and resumes unfinished ones; `--dry_run` prints
the per-variant commands for a cluster scheduler instead.
"""
import ast
import dataclasses
import itertools
import pathlib
import shlex
import subprocess
import sys

import ml_collections
from absl import logging
from etils import epath

from mobilenet.experiments import evaluate
from mobilenet.training import train
from mobilenet.errors import UserError

TRAIN_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / 'scripts' / 'train.py'


@dataclasses.dataclass(frozen=True)
class Variant:
  """One point of the grid: its overrides (field, value as typed) and where it trains."""
  overrides: tuple[tuple[str, str], ...]
  workdir: epath.Path  # Local or gs://: pathlib would fold gs:// into gs:/.


def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
  """'field=v1,v2' strings (each may hold several, separated by ';') -> [(field, values)]."""
  axes = []
  for spec in (part.strip() for text in specs for part in text.split(';')):
    if not spec:
      continue
    field, separator, values = spec.partition('=')
    field = field.strip().removeprefix('config.')
    values = [value.strip() for value in values.split(',') if value.strip()]
    if not separator or not field or not values:
      raise UserError(f'--sweep {spec!r} is not field=value1,value2,...; e.g. '
                      '--sweep model.width_multiplier=0.25,0.5')
    if field in (existing for existing, _ in axes):
      raise UserError(f'--sweep names config.{field} twice; list all its values in one flag')
    axes.append((field, values))
  return axes


def _parse_value(text: str):
  """'0.25' -> 0.25, 'True' -> True, 'separable' -> 'separable'."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: tuple[tuple[str, str], ...]) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with the overrides set; a bad field or type is a UserError."""
  variant = ml_collections.ConfigDict(config.to_dict())
  for field, text in overrides:
    *parents, leaf = field.split('.')
    node = variant
    try:
      for part in parents:
        node = node[part]
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(field)
      node[leaf] = _parse_value(text)
    except KeyError:
      raise UserError(f'--sweep names config.{field}, which the config does not have; check '
                      'the field name against the config file') from None
    except TypeError as error:
      raise UserError(f'--sweep value {text!r} does not fit config.{field} ({error})') from None
  return variant


def _short_names(fields: list[str]) -> list[str]:
  """The last part of each dotted field, or the whole field where two would clash."""
  leaves = [field.rsplit('.', 1)[-1] for field in fields]
  return [leaf if leaves.count(leaf) == 1 else field for field, leaf in zip(fields, leaves)]


def variants(axes: list[tuple[str, list[str]]], sweep_dir: str | epath.Path) -> list[Variant]:
  """The grid's product, first axis slowest; folders like 'width_multiplier=0.25,resolution=28'."""
  fields = [field for field, _ in axes]
  names = _short_names(fields)
  grid = []
  for values in itertools.product(*(values for _, values in axes)):
    folder = ','.join(f'{name}={value}' for name, value in zip(names, values))
    grid.append(Variant(tuple(zip(fields, values)), epath.Path(sweep_dir) / folder))
  return grid


def train_command(config_file: str, passthrough: dict[str, object], variant: Variant) -> list[str]:
  """The scripts/train.py command line of one variant."""
  command = [sys.executable, str(TRAIN_SCRIPT), f'--config={config_file}',
             f'--workdir={variant.workdir}']
  command += [f'--config.{field}={value}' for field, value in passthrough.items()]
  command += [f'--config.{field}={value}' for field, value in variant.overrides]
  return command


def total_steps(config: ml_collections.ConfigDict) -> int:
  """The number of steps the run trains for; reads the dataset's size only when needed."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  from mobilenet.data import input_pipeline  # TensorFlow is imported only for epoch-based runs.
  return train.total_train_steps(config, input_pipeline.steps_per_epoch(config))


def variant_state(config: ml_collections.ConfigDict, variant: Variant) -> str:
  """'finished', 'resume' (a checkpoint short of the end) or 'start'."""
  step = evaluate.latest_checkpoint_step(variant.workdir)
  if step is None:
    return 'start'
  return 'finished' if step >= total_steps(config) else 'resume'


def run_sweep(config: ml_collections.ConfigDict, config_file: str, sweep_dir: str,
              sweep_specs: list[str], passthrough: dict[str, object], dry_run: bool = False,
              output_dir: str | None = None) -> list[Variant]:
  """Trains every variant (skipping finished ones), then evaluates them all.

  `config` is the loaded config with `passthrough` already applied (to plan the
  grid and detect finished variants). Returns the variants that failed; with
  `dry_run`, prints one command per variant and runs nothing.
  """
  specs = sweep_specs or ([config.sweep] if 'sweep' in config and config.sweep else [])
  if not specs:
    raise UserError('no sweep axes; pass --sweep field=v1,v2 (e.g. '
                    '--sweep model.width_multiplier=0.25,0.5) or use a config with config.sweep')
  grid = variants(parse_axes(specs), sweep_dir)
  configs = [apply_overrides(config, variant.overrides) for variant in grid]  # Checks all first.
  if dry_run:
    for variant in grid:
      print(shlex.join(train_command(config_file, passthrough, variant)), flush=True)
    return []
  failed = []
  for index, (variant, variant_config) in enumerate(zip(grid, configs), 1):
    state = variant_state(variant_config, variant)
    prefix = f'[{index}/{len(grid)}] {variant.workdir.name}'
    if state == 'finished':
      print(f'{prefix}: finished, skipped', flush=True)
      continue
    print(f'{prefix}: {"resumed" if state == "resume" else "started"}', flush=True)
    returncode = subprocess.call(train_command(config_file, passthrough, variant))
    if returncode:
      print(f'{prefix}: FAILED (exit code {returncode}); continuing with the others', flush=True)
      failed.append(variant)
    else:
      print(f'{prefix}: done', flush=True)
  table, _ = evaluate.evaluate_runs([str(v.workdir) for v in grid], output_dir or sweep_dir)
  print(table, flush=True)
  if failed:
    logging.error('%d of %d variants failed: %s', len(failed), len(grid),
                  ', '.join(v.workdir.name for v in failed))
  return failed
