"""normlib: stable, explicit-state normalization functions for JAX."""

from importlib import metadata as _metadata

from normlib._batch_norm import (
    BatchNormState,
    batch_norm,
    batch_renorm,
    fold_batch_norm,
    init_batch_norm,
    l1_batch_norm,
    lp_batch_norm,
    renorm_schedule,
)
from normlib._info import print_environment_info
from normlib._layer_norm import group_norm, instance_norm, layer_norm, rms_norm
from normlib._lp_norm import l1_normalize, l2_normalize, lp_normalize
from normlib._precise import precise_batch_stats
from normlib._weight_decay import weight_decay_mask

_FLAX_HELPERS = ('precise_linen', 'precise_nnx')


def __getattr__(name):
    # The Flax helpers load Flax, which `import normlib` alone does not.
    if name in _FLAX_HELPERS:
        from normlib import precise_flax
        return getattr(precise_flax, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

try:
    __version__ = _metadata.version('normlib')
except _metadata.PackageNotFoundError:  # imported from a source tree, not installed
    __version__ = '0+unknown'

__all__ = [
    'BatchNormState',
    'batch_norm',
    'batch_renorm',
    'fold_batch_norm',
    'group_norm',
    'init_batch_norm',
    'instance_norm',
    'l1_batch_norm',
    'l1_normalize',
    'l2_normalize',
    'lp_batch_norm',
    'layer_norm',
    'lp_normalize',
    'precise_batch_stats',
    'print_environment_info',
    'renorm_schedule',
    'rms_norm',
    'weight_decay_mask',
]
