"""Test-session setup, read by pytest before anything imports JAX or Keras.

Eight virtual CPU devices for the multi-device tests, Keras on its JAX
backend, and the doctests of optional front-ends skipped when their extra is
not installed.
"""

import importlib.util
import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('KERAS_BACKEND', 'jax')

collect_ignore = [path for module, path in (('keras', 'normlib/keras.py'),
                                            ('equinox', 'normlib/equinox.py'))
                  if importlib.util.find_spec(module) is None]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (default runs of the examples, the benchmark
    harness) go first, so that pytest-xdist's workers do not wait on one of
    them at the end."""
    items.sort(key=lambda item: item.get_closest_marker('long') is None)  # stable
