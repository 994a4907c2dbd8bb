"""Test-session setup, read by pytest before anything imports JAX or Keras.

Eight virtual CPU devices for the multi-device tests, Keras on its JAX
backend, and the doctests of optional front-ends skipped when their extra is
not installed.
"""

import importlib.util
import os

# A loaded 2-core machine can bring the 8 virtual devices' threads to a
# collective far apart: give them time instead of aborting the run as stuck.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    ' --xla_cpu_collective_call_terminate_timeout_seconds=600').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('KERAS_BACKEND', 'jax')

collect_ignore = [path for module, path in (('keras', 'normlib/keras.py'),
                                            ('equinox', 'normlib/equinox.py'))
                  if importlib.util.find_spec(module) is None]
