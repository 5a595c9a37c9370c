"""The one exception type for problems a user can fix, and how scripts report it.

Every check of user input (config values, missing datasets, unwritable workdirs,
corrupt checkpoints) raises `UserError` with a single sentence that names the
problem and the fix. Scripts wrap their `main` with `exit_on_user_error` so the
user sees that one line and a non-zero exit code instead of a traceback.
"""
import functools
import sys


class UserError(Exception):
  """A problem in the user's input: the message names the problem and the fix."""


EXIT_CODE = 2


def exit_on_user_error(main):
  """Decorates an absl `main` so that a `UserError` prints one line and exits 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as error:
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.exit(EXIT_CODE)

  return wrapped
