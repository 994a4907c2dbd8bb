"""Test-session setup, read by pytest before anything imports JAX or Keras.

Eight virtual CPU devices for the multi-device tests, Keras on its JAX
backend, one compilation cache for the session, and the doctests of optional
front-ends skipped when their extra is not installed.
"""

import importlib.util
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('KERAS_BACKEND', 'jax')

# pytest-xdist's workers (which inherit this environment) and the processes the
# tests start compile many of the same programs, the module fixtures' included:
# each one is compiled once per session, into a folder removed at its end.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='normlib-tests-jax-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

collect_ignore = [path for module, path in (('keras', 'normlib/keras.py'),
                                            ('equinox', 'normlib/equinox.py'))
                  if importlib.util.find_spec(module) is None]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (default runs of the examples, the benchmark
    harness) go first, so that pytest-xdist's workers do not wait on one of
    them at the end."""
    items.sort(key=lambda item: item.get_closest_marker('long') is None)  # stable


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
