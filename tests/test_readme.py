"""The README's commands against the scripts: they must keep working as written.

Every `python3 scripts/X.py ...` command in the README (code blocks and inline
code) is parsed by the script itself with absl's --only_check_args: its flags,
the config file and every --config.x=y override must exist, and no required
flag may be missing; nothing runs. The cheap ones (count_params.py) run for
real. The two set-up commands must be the ones .ci/run executes, every script's
--help must exit 0 and explain --config, and the Layout list must name every
module there is.
"""
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
SCRIPTS = sorted(path.name for path in (ROOT / 'scripts').glob('*.py'))
# How the README calls Python: python3 (with .venv active) or the venv's interpreter.
PYTHON = r'(?:python3|\.venv/bin/python)'


def code_blocks(text: str) -> list[str]:
  return re.findall(r'```[a-z]*\n(.*?)```', text, flags=re.S)


def readme_commands() -> list[str]:
  """Every `<python> scripts/X.py ...` command of the README, continuations joined."""
  commands = []
  for block in code_blocks(README):
    block = block.replace('\\\n', ' ')
    for line in block.splitlines():
      for part in re.split(r'&&|;', line.split('#')[0]):
        part = part.strip()
        if re.match(PYTHON + r' scripts/\S+\.py', part):
          commands.append(part)
  for span in re.findall(r'`([^`\n]+)`', re.sub(r'```.*?```', '', README, flags=re.S)):
    if re.match(PYTHON + r' scripts/\S+\.py', span):
      commands.append(span)
  return list(dict.fromkeys(commands))


def run_script(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_kind_of_use():
  scripts = {shlex.split(command)[1] for command in COMMANDS}
  for expected in ('scripts/train.py', 'scripts/eval.py', 'scripts/sweep.py',
                   'scripts/count_params.py', 'scripts/benchmark.py'):
    assert expected in scripts


def test_no_plain_python_in_the_readme():
  """Debian and Ubuntu have no `python`: commands say python3 (or .venv/bin/python)."""
  lines = [line for block in code_blocks(README) for line in block.splitlines()]
  lines += re.findall(r'`([^`\n]+)`', README)
  assert not [line for line in lines if re.match(r'\s*python\s', line)]


@pytest.mark.slow
@pytest.mark.parametrize('command', COMMANDS)
def test_readme_command_parses(command):
  """The script accepts every flag, the config file and every override of the command."""
  args = shlex.split(command)[1:]
  result = run_script([*args, '--only_check_args'])
  assert result.returncode == 0, f'{command}\n{result.stderr[-2000:]}'


@pytest.mark.slow
@pytest.mark.parametrize('command', [c for c in COMMANDS if 'count_params.py' in c])
def test_readme_count_params_commands_run(command):
  result = run_script(shlex.split(command)[1:])
  assert result.returncode == 0, f'{command}\n{result.stderr[-2000:]}'
  if '--example' in command:  # The README's opening example: 108 weights vs 27 + 12 = 39.
    assert all(number in result.stdout for number in ('108', '27', '12', '39'))
  elif '--json' not in command:
    assert 'total' in result.stdout


def test_the_check_fails_on_a_flag_the_script_does_not_have():
  """The tests above can fail: a misspelled flag or override is rejected."""
  assert run_script(['scripts/train.py', '--config', 'configs/default.py', '--workdir', 'runs/x',
                     '--workdirr', 'y', '--only_check_args']).returncode != 0
  assert run_script(['scripts/count_params.py', '--config', 'configs/default.py',
                     '--config.model.no_such_field=1', '--only_check_args']).returncode != 0


def test_two_commands_are_what_ci_runs():
  two_commands = README[README.index('## Two commands'):README.index('## Layout')]
  lines = [line for line in code_blocks(two_commands)[0].splitlines()
           if line and not line.startswith('#')]
  assert [line.split(' && ')[0] for line in lines] == ['bash scripts/setup.sh'] * 2
  test_command = lines[1].split(' && ')[1]
  ci = (ROOT / '.ci' / 'run').read_text()
  assert 'bash scripts/setup.sh\n' in ci
  assert re.search(r'(?m)^' + re.escape(test_command) + r' \|\| status=\$\?$', ci)
  # What setup.sh installs is what the README says it installs.
  setup = (ROOT / 'scripts' / 'setup.sh').read_text()
  packages = re.search(r'APT_PACKAGES=\(([^)]*)\)', setup).group(1).split()
  assert packages and all(f'`{package}`' in two_commands for package in packages)
  assert 'apt-get update' in setup and 'python3 -m venv .venv' in setup
  assert 'pip install -q --disable-pip-version-check -r requirements.txt' in setup


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_help_exits_0_and_explains_the_config(script):
  result = run_script([f'scripts/{script}', '--help'])
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'scripts/{script}' in result.stdout  # The usage examples.
  if '--config:' in result.stdout:
    text = ' '.join(result.stdout.split())
    assert 'file.py:arg' in text and '--config.<field>=<value>' in text
    assert 'mobilenet/training/config_base.py' in text
  # Usage examples keep their line continuations (a plain docstring would join the lines).
  source = (ROOT / 'scripts' / script).read_text()
  for continued in re.findall(r'(?m)^ +(python3 scripts/.*) \\$', source):
    assert f'{continued} \\\n' in result.stdout


def test_dash_h_is_help_too():
  result = run_script(['scripts/count_params.py', '-h'])
  assert result.returncode == 0 and '--config' in result.stdout


def test_missing_required_flags_are_named_in_one_line():
  result = run_script(['scripts/train.py'])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: missing required flags --config, --workdir; see --help']


def test_layout_names_every_module_and_only_files_that_exist():
  layout = code_blocks(README[README.index('## Layout'):])[0]
  named = set(re.findall(r'[\w.]+\.(?:py|sh|cc|h|md)\b', layout))
  existing = {path.name for path in ROOT.rglob('*') if not _in_a_venv(path)}
  assert named <= existing, named - existing
  modules = {path.name for folder in ('mobilenet', 'scripts')
             for path in (ROOT / folder).rglob('*') if path.suffix in ('.py', '.sh', '.cc', '.h')
             and path.name != '__init__.py'}
  assert modules <= named, modules - named
  for folder in re.findall(r'(?m)^\s*([\w.]+)/\s', layout):
    assert any(path.is_dir() for path in ROOT.rglob(folder) if not _in_a_venv(path)), folder


def _in_a_venv(path: pathlib.Path) -> bool:
  """Inside .venv or .venv-torch (the PyTorch yardstick's), whose files are no part of the layout."""
  return any(part.startswith('.venv') for part in path.relative_to(ROOT).parts)


@pytest.mark.parametrize('document', ['README.md', 'docs/performance.md'])
def test_docs_point_at_nothing_outside_the_repository(document):
  text = (ROOT / document).read_text()
  assert '../' not in text and '/path/to' not in text
  paths = re.findall(r'\b(?:mobilenet|scripts|configs|docs|tests)/[\w/]+\.\w+', text)
  assert paths
  assert not [path for path in paths if not (ROOT / path).exists()]
