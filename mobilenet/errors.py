"""The one exception type for problems a user can fix, and how scripts report them.

Every check of user input (config values, missing datasets, unwritable workdirs,
corrupt checkpoints) raises `UserError` with a single sentence that names the
problem and the fix. Scripts start through `run(main)`, so the user sees that
one line and exit code 2 instead of a traceback, also when the config file
itself cannot be loaded or an override names no field. `run` also makes
--help exit 0 (absl exits 1) and names every missing required flag at once.
"""
import functools
import os
import sys

from absl import app, flags

EXIT_CODE = 2
# The help of every script's --config flag: the forms it takes and where the fields are.
CONFIG_HELP = (
    'Experiment config: a Python file whose get_config() returns it (configs/*.py), '
    'or file.py:arg to pass get_config an argument (configs/cifar10.py:0.5). Override any '
    'field with --config.<field>=<value> (--config.num_epochs=3, '
    '--config.model.width_multiplier=0.5); mobilenet/training/config_base.py lists every '
    'field with its default and meaning.')
# absl's help flags, which print and exit before main.
_HELP_FLAGS = frozenset({'help', '?', 'helpshort', 'helpfull', 'helpxml'})
_required: list[str] = []


class UserError(Exception):
  """A problem in the user's input: the message names the problem and the fix."""


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_CODE)


def exit_on_user_error(main):
  """Decorates an absl `main` so that a `UserError` prints one line and exits 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as error:
      _fail(str(error))

  return wrapped


def _describe_flag_problem(error: Exception) -> str:
  """One line for a flag or config-file problem, naming where it is."""
  if isinstance(error, SyntaxError):
    return (f'the config file {error.filename} has a syntax error at line {error.lineno} '
            f'({error.msg}); fix the file')
  if isinstance(error, flags.Error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0]
    if 'Traceback (most recent call last):' in lines:
      # ml_collections puts the config file's own exception in the message as a traceback:
      # keep its last line (the cause) and the config file's frame (where).
      frames = [line for line in lines if line.startswith('File ') and 'ml_collections' not in line]
      text = f'{text.rstrip(":;")}: {lines[-1]}' + (f' ({frames[-1]})' if frames else '')
    return f'{text}; see --helpfull for the flags and the config file for its fields'
  if isinstance(error, (AttributeError, KeyError)):
    return (f'an override names a field the config does not have ({error}); check the '
            '--config.x=y flags against the config file')
  if isinstance(error, OSError) and error.__cause__ is not None:
    error = error.__cause__  # ml_collections wraps the real reason (e.g. no such file).
  first_line = ' '.join(str(error).split())[:300]
  return (f'the config could not be loaded ({type(error).__name__}: {first_line}); check the '
          '--config path and the file')


def mark_required(names: list[str]) -> None:
  """Marks flags required: `run` names all that are missing in one line, --help says so.

  Instead of absl's `mark_flags_as_required`, whose validators stop at the first.
  """
  for name in names:
    _required.append(name)
    flag = flags.FLAGS[name]
    flag.help += ' (required)'
    flag.default_as_str = None  # Else --help shows "(default: 'None')" for it.


def _asks_for_help(argv) -> bool:
  return any(arg.startswith('-') and arg.lstrip('-').split('=')[0] in _HELP_FLAGS
             for arg in argv[1:])


def _parse_flags(argv):
  argv = [argv[0], *('--help' if arg == '-h' else arg for arg in argv[1:])]  # absl knows -? only.
  try:
    remaining = flags.FLAGS(argv)
    missing = [f'--{name}' for name in _required if flags.FLAGS[name].value is None]
    if missing:
      _fail(f'missing required flag{"s" if len(missing) > 1 else ""} {", ".join(missing)}; '
            'see --help')
    for name in flags.FLAGS:  # A config that failed to load raises on first use: use it now.
      getattr(flags.FLAGS[name].value, 'keys', None)
    return remaining
  except BrokenPipeError:  # `--help | head`: the reader stopped reading, which is fine.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # No error again at exit.
    sys.exit(0)
  except SystemExit as exit_:
    # absl's --help prints the usage and exits 1, which reads as a failure.
    if exit_.code == 1 and _asks_for_help(argv):
      sys.exit(0)
    raise
  except Exception as error:  # Config files are user code: anything can go wrong in them.
    _fail(_describe_flag_problem(error))


def run(main) -> None:
  """`absl.app.run(main)` with every user-input problem reported as one line, exit 2."""
  app.run(exit_on_user_error(main), flags_parser=_parse_flags)
