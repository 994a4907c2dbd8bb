"""Fixtures shared by the tests (the session setup is in the root conftest.py)."""

import pytest


@pytest.fixture(scope='session')
def torch():
    """PyTorch, an optional oracle: a test that takes it skips when it is absent."""
    return pytest.importorskip('torch', reason='torch (an optional test oracle) is not installed')
