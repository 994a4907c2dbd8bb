"""Eight virtual CPU devices for the multi-device tests; set before JAX starts."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def torch():
    """PyTorch, an optional oracle: a test that takes it skips when it is absent."""
    return pytest.importorskip('torch', reason='torch (an optional test oracle) is not installed')
