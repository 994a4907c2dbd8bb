"""What to paste into a bug report."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import TextIO

import jax

_PACKAGES = ('normlib', 'jax', 'jaxlib', 'flax', 'optax', 'numpy', 'chex', 'keras', 'equinox',
             'torch')


def print_environment_info(file: TextIO | None = None) -> str:
    """Prints (and returns) the versions and devices a bug report needs.

    normlib, jax, jaxlib, flax, optax and numpy (and the optional extras
    when installed), Python, the platform, JAX's default backend and its
    devices, as :func:`jax.print_environment_info` does for JAX. Reads
    package versions from their metadata: Flax is not imported.

    Args:
      file: where to print (default ``sys.stdout``).

    Example:
        >>> import io, normlib
        >>> report = normlib.print_environment_info(io.StringIO())
        >>> report.splitlines()[0] == f'normlib: {normlib.__version__}'
        True
    """
    lines = []
    for name in _PACKAGES:
        try:
            lines.append(f'{name}: {metadata.version(name)}')
        except metadata.PackageNotFoundError:
            if name not in ('keras', 'equinox', 'torch', 'chex'):
                lines.append(f'{name}: not installed')
    lines.append(f'python: {sys.version.split()[0]} ({platform.python_implementation()})')
    lines.append(f'platform: {platform.platform()}')
    lines.append(f'jax backend: {jax.default_backend()}')
    devices = jax.devices()
    lines.append(f'jax devices: {len(devices)} x {devices[0].device_kind}'
                 f' (process {jax.process_index()} of {jax.process_count()})')
    text = '\n'.join(lines)
    print(text, file=file if file is not None else sys.stdout)
    return text
