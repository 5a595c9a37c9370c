"""The CLIs re-execute themselves once with glibc malloc settings that XLA:CPU needs."""
import os
import pathlib
import subprocess
import sys
import textwrap

from mobilenet import malloc_tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tuned_environment_adds_settings_and_keeps_the_users():
  env = malloc_tuning.tuned_environment({'GLIBC_TUNABLES': 'glibc.malloc.mmap_max=7', 'HOME': '/x'})
  items = env['GLIBC_TUNABLES'].split(':')
  assert 'glibc.malloc.mmap_max=7' in items  # The user's value wins.
  assert 'glibc.malloc.mmap_max=0' not in items
  assert 'glibc.malloc.hugetlb=1' in items
  assert env['HOME'] == '/x'


def test_untuned_environment_gives_back_what_the_process_found():
  for found in ({}, {'GLIBC_TUNABLES': 'glibc.malloc.mmap_max=7'}):
    tuned = malloc_tuning.tuned_environment({'HOME': '/x', **found})
    assert 'glibc.malloc.hugetlb=1' in tuned['GLIBC_TUNABLES']
    assert malloc_tuning.untuned_environment(tuned) == {'HOME': '/x', **found}
  untouched = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'HOME': '/x'}  # Never tuned by us.
  assert malloc_tuning.untuned_environment(untouched) == untouched


def _run(script: str, **env):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(script), 'arg1'], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env={**{k: v for k, v in os.environ.items()
                                if k not in ('GLIBC_TUNABLES', 'MOBILENET_MALLOC_TUNING')}, **env})


SCRIPT = """
    import os, sys
    from mobilenet import malloc_tuning
    print('before', os.getpid(), flush=True)
    malloc_tuning.reexec_with_tuned_malloc()
    print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])
"""


def test_reexec_happens_once_in_the_same_process_with_the_same_arguments():
  result = _run(SCRIPT)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  if not sys.platform.startswith('linux'):
    assert lines[-1].startswith('after')
    return
  # Printed twice before (once per execution), once after; the same PID throughout.
  assert [line.split()[0] for line in lines] == ['before', 'before', 'after']
  assert len({line.split()[1] for line in lines}) == 1
  assert 'glibc.malloc.mmap_max=0' in lines[-1] and "['arg1']" in lines[-1]


def test_reexec_can_be_turned_off():
  result = _run(SCRIPT, MOBILENET_MALLOC_TUNING='0')
  assert result.returncode == 0, result.stderr
  assert [line.split()[0] for line in result.stdout.splitlines()] == ['before', 'after']
