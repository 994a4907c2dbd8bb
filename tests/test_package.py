"""The package's face: version, environment report, what importing loads."""

import io
import json
import subprocess
import sys
from importlib import metadata

import jax
import pytest

import normlib


def test_version_comes_from_the_installed_metadata():
    assert normlib.__version__ == metadata.version('normlib')


def test_print_environment_info_names_versions_and_devices():
    out = io.StringIO()
    text = normlib.print_environment_info(file=out)
    assert out.getvalue().strip() == text
    lines = dict(line.split(': ', 1) for line in text.splitlines())
    assert lines['normlib'] == normlib.__version__
    assert lines['jax'] == jax.__version__
    assert lines['flax'] == metadata.version('flax')
    assert lines['python'].startswith('.'.join(map(str, sys.version_info[:2])))
    assert lines['jax backend'] == jax.default_backend()
    assert lines['jax devices'].startswith(f'{len(jax.devices())} x ')


# What a fresh interpreter loads, step by step (one interpreter for the three steps:
# each start imports JAX): `import normlib` and its environment report load no
# front-end; normlib.precise_linen loads Flax when it is first used.
_LOADS = """
import io, json, sys
loaded = lambda: [m for m in ('flax', 'optax', 'chex', 'equinox', 'keras') if m in sys.modules]
steps = {}
import normlib
steps['import normlib'] = loaded()
normlib.print_environment_info(io.StringIO())
steps['environment report'] = loaded()
normlib.precise_linen
steps['precise_linen'] = 'flax' in sys.modules
print(json.dumps(steps))
"""


@pytest.fixture(scope='module')
def loads():
    out = subprocess.run([sys.executable, '-c', _LOADS], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_import_loads_no_front_end(loads):
    assert loads['import normlib'] == [], loads


def test_environment_report_does_not_import_flax(loads):
    assert loads['environment report'] == [], loads


def test_flax_is_loaded_when_a_flax_helper_is_first_used(loads):
    assert loads['precise_linen'] is True, loads


PUBLIC_MODULES = ('linen', 'nnx', 'keras', 'equinox', 'precise_flax', 'torch_interop')


def test_each_public_name_means_one_thing():
    # A function exported by normlib is never also a module of that name, and
    # every other module in the package is private (leading underscore).
    import pkgutil
    names = {m.name for m in pkgutil.iter_modules(normlib.__path__)}
    assert not names & set(normlib.__all__), names & set(normlib.__all__)
    public = {n for n in names if not n.startswith('_')}
    assert public == set(PUBLIC_MODULES), public


def _public_callables():
    import importlib
    import inspect
    seen = []
    for module_name in ('normlib',) + tuple(f'normlib.{m}' for m in PUBLIC_MODULES):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional front-end that is not installed
            continue
        names = getattr(module, '__all__', None) or [
            n for n, v in vars(module).items()
            if not n.startswith('_') and getattr(v, '__module__', None) == module_name]
        for name in names:
            value = getattr(module, name)
            if inspect.isclass(value):
                for attr in ('__init__', '__call__', 'call'):
                    method = getattr(value, attr, None)
                    if inspect.isfunction(method) and method.__module__.startswith('normlib'):
                        seen.append((f'{module_name}.{name}.{attr}', method))
            elif inspect.isfunction(value):
                seen.append((f'{module_name}.{name}', value))
    return seen


def test_public_functions_have_type_hints_for_every_parameter_and_the_return():
    # The package ships py.typed: its public signatures must be typed.
    import inspect
    missing = []
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name not in ('self', 'cls') and p.annotation is inspect.Parameter.empty \
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                missing.append(f'{name}({p.name})')
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f'{name} -> ?')
    assert len(_public_callables()) > 20
    assert not missing, missing


def test_nnx_does_not_load_linen_on_normlibs_account():
    # normlib.nnx and normlib.linen share normlib._flax, which imports neither;
    # what `import normlib.nnx` loads beyond `import flax.nnx` is normlib's own.
    code = ('import sys; import flax.nnx; before = set(sys.modules); import normlib.nnx;'
            ' print(sorted(m for m in set(sys.modules) - before'
            ' if not m.startswith("normlib") or m == "normlib.linen"))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    added = out.stdout.strip()
    assert 'normlib.linen' not in added and 'flax.linen' not in added, added
