"""The README's code blocks run as written, and its set-up commands stay in sync with CI."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_readme_has_code():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f'README.md block {index}', 'exec'), {'__name__': 'readme'})


def test_setup_commands():
    text = README.read_text()
    commands = re.findall(r'^python3 -m venv .*$', text, flags=re.M)
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert 'pip install -e ".[examples]"' in main_job
    assert main_job.endswith('python examples/bn_mnist.py')
    assert 'pip install -e ".[test]"' in tests and tests.endswith('python -m pytest -n 2')
