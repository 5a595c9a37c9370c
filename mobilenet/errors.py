"""The one exception type for problems a user can fix, and how scripts report them.

Every check of user input (config values, missing datasets, unwritable workdirs,
corrupt checkpoints) raises `UserError` with a single sentence that names the
problem and the fix. Scripts start through `run(main)`, so the user sees that
one line and exit code 2 instead of a traceback, also when the config file
itself cannot be loaded or an override names no field.
"""
import functools
import sys

from absl import app, flags

EXIT_CODE = 2


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


def _parse_flags(argv):
  try:
    remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:  # A config that failed to load raises on first use: use it now.
      getattr(flags.FLAGS[name].value, 'keys', None)
    return remaining
  except Exception as error:  # Config files are user code: anything can go wrong in them.
    _fail(_describe_flag_problem(error))


def run(main) -> None:
  """`absl.app.run(main)` with every user-input problem reported as one line, exit 2."""
  app.run(exit_on_user_error(main), flags_parser=_parse_flags)
