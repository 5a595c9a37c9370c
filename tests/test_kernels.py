"""The C++ kernels' build: cached under a stable key, and built once when processes start together."""
import os
import pathlib
import subprocess
import sys
import time

from mobilenet.ops.cpu import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ('from absl import logging; logging.set_verbosity(logging.INFO); '
         'from mobilenet.ops.cpu import kernels; print(kernels.build())')
# A stand-in compiler: records each call, waits until the test releases it, writes the -o file.
FAKE_COMPILER = '''#!/bin/sh
echo called >> "$CALLS"
for _ in $(seq 600); do [ -e "$RELEASE" ] && break; sleep 0.1; done
while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
echo built > "$out"
'''


def _wait_for(condition, seconds: float = 120) -> None:
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.1)


def test_a_second_process_waits_for_the_first_build_and_reuses_it(tmp_path):
  compiler = tmp_path / 'fake_cxx'
  compiler.write_text(FAKE_COMPILER)
  compiler.chmod(0o755)
  calls, release = tmp_path / 'calls', tmp_path / 'release'
  environment = dict(os.environ, CXX=str(compiler), CALLS=str(calls), RELEASE=str(release),
                     MOBILENET_CACHE_DIR=str(tmp_path / 'cache'), PYTHONPATH=str(ROOT))

  def start():
    return subprocess.Popen([sys.executable, '-c', BUILD], env=environment, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  first = start()
  try:
    _wait_for(calls.exists)  # The first process is compiling (and holds the lock).
    second = start()
    try:
      waiting = []

      def second_is_waiting():
        line = second.stderr.readline()
        waiting.append(line)
        return 'Waiting for another process' in line or second.poll() is not None

      _wait_for(second_is_waiting)
      assert 'Waiting for another process' in waiting[-1], ''.join(waiting)
    finally:
      release.touch()
      second_out, _ = second.communicate(timeout=120)
  finally:
    release.touch()
    first_out, first_err = first.communicate(timeout=120)
  assert first.returncode == 0 and second.returncode == 0, first_err
  library = pathlib.Path(first_out.strip())
  assert second_out.strip() == str(library)
  assert library.read_text() == 'built\n'
  # Built once, not twice: one compiler process per source, then the link.
  assert calls.read_text().splitlines() == ['called'] * (len(kernels.SOURCES) + 1)


def test_a_new_process_finds_the_cached_build_without_compiling(tmp_path):
  """The cache key (sources, jax version, CPU flags) is the same in the next process."""
  compiler = tmp_path / 'fake_cxx'
  compiler.write_text(FAKE_COMPILER)
  compiler.chmod(0o755)
  (tmp_path / 'release').touch()
  environment = dict(os.environ, CXX=str(compiler), CALLS=str(tmp_path / 'calls'),
                     RELEASE=str(tmp_path / 'release'), MOBILENET_CACHE_DIR=str(tmp_path / 'cache'),
                     PYTHONPATH=str(ROOT))
  built = subprocess.run([sys.executable, '-c', BUILD], env=environment, capture_output=True,
                         text=True, check=True)
  # No compiler at all now: build() must find the library, not try to compile it.
  again = subprocess.run([sys.executable, '-c', BUILD], env=dict(environment, CXX='/nonexistent'),
                         capture_output=True, text=True, check=True)
  assert again.stdout.strip() == built.stdout.strip()
  assert (tmp_path / 'calls').read_text().splitlines() == ['called'] * (len(kernels.SOURCES) + 1)
