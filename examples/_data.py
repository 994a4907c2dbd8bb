"""Data sets for the examples: scikit-learn's handwritten digits and MNIST.

Both loaders return a `Dataset` of float32 images scaled to [0, 1] and
flattened to rows, int32 labels, and the image shape so that convolutional
models can restore it.

- `load_digits()` uses the 1797 8x8 digits bundled with scikit-learn (no
  download), split once with a fixed permutation into 1397 training and 400
  held-out examples.
- `load_mnist(data_dir)` reads the standard MNIST IDX `.gz` files. With the
  training files present it uses the 60k/10k split; with only the 10k test
  set (`t10k-*`) it trains on the first 8000 images and holds out the last
  2000.

`add_args` and `check_args` give every example the same `--data` and
`--data-dir` options; `batches` draws the mini-batches of a seeded run.
"""

import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np

# IDX type codes (third byte of the magic number) -> big-endian dtype.
_IDX_DTYPES = {
        0x08: np.dtype('u1'),
        0x09: np.dtype('i1'),
        0x0B: np.dtype('>i2'),
        0x0C: np.dtype('>i4'),
        0x0D: np.dtype('>f4'),
        0x0E: np.dtype('>f8'),
}

DIGITS_HELD_OUT = 400
MNIST_TEST_ONLY_TRAIN = 8000


class Dataset(NamedTuple):
    x_train: np.ndarray  # (n_train, height * width) float32 in [0, 1]
    y_train: np.ndarray  # (n_train,) int32
    x_test: np.ndarray  # (n_test, height * width) float32 in [0, 1]
    y_test: np.ndarray  # (n_test,) int32
    image_shape: tuple  # (height, width)
    name: str


def read_idx(path):
    """Reads one IDX file (optionally gzipped) into a NumPy array.

    The header is two zero bytes, a type code, the number of dimensions, then
    one big-endian uint32 per dimension (so images start with the magic number
    2051 and labels with 2049).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f'{path}: not an IDX file (bad magic number {raw[:4]!r})')
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f'{path}: unknown IDX type code {type_code:#04x}')
    dtype = _IDX_DTYPES[type_code]
    header_size = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
                f'{path}: header says shape {shape} ({expected} bytes), '
                f'file has {len(raw)} bytes')
    return np.frombuffer(raw, dtype, offset=header_size).reshape(shape)


def _images(array):
    return (array.reshape(len(array), -1) / 255.0).astype(np.float32)


def load_mnist(data_dir):
    """Loads MNIST from the IDX `.gz` files in `data_dir`."""
    data_dir = Path(data_dir)

    def read(name):
        return read_idx(data_dir / f'{name}-ubyte.gz')

    if not (data_dir / 't10k-images-idx3-ubyte.gz').exists():
        raise FileNotFoundError(
                f'{data_dir}: expected t10k-images-idx3-ubyte.gz and '
                't10k-labels-idx1-ubyte.gz (and optionally the train-* files)')
    test_images, test_labels = read('t10k-images-idx3'), read('t10k-labels-idx1')
    if len(test_images) != len(test_labels):
        raise ValueError(f'{data_dir}: {len(test_images)} test images but '
                                          f'{len(test_labels)} labels')
    if (data_dir / 'train-images-idx3-ubyte.gz').exists():
        train_images = read('train-images-idx3')
        train_labels = read('train-labels-idx1')
    else:
        n = MNIST_TEST_ONLY_TRAIN
        train_images, train_labels = test_images[:n], test_labels[:n]
        test_images, test_labels = test_images[n:], test_labels[n:]
    return Dataset(
            _images(train_images), train_labels.astype(np.int32),
            _images(test_images), test_labels.astype(np.int32),
            image_shape=tuple(test_images.shape[1:]), name='mnist')


def load_digits():
    """Loads scikit-learn's 8x8 digits with a fixed train/held-out split."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    # Fixed, seed-independent split so that every run is scored on the same
    # held-out examples.
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:-DIGITS_HELD_OUT], order[-DIGITS_HELD_OUT:]
    return Dataset(x[train], y[train], x[test], y[test],
                                  image_shape=(8, 8), name='digits')


def add_args(parser):
    """Adds the examples' shared `--data` and `--data-dir` options."""
    parser.add_argument('--data', choices=('digits', 'mnist'), default='digits',
                        help='digits: scikit-learn 8x8 digits (default); '
                             'mnist: the IDX .gz files in --data-dir')
    parser.add_argument('--data-dir', type=Path,
                        help='folder with the MNIST IDX .gz files')


def check_args(parser, args):
    if args.data == 'mnist' and args.data_dir is None:
        parser.error('--data mnist needs --data-dir')


def batches(seed, num_examples, steps, batch_size):
    """Mini-batch indices, shape (steps, batch_size): shuffled epochs."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def load(name, data_dir=None):
    """Loads `'digits'` or `'mnist'` (which needs `data_dir`)."""
    if name == 'digits':
        return load_digits()
    if name == 'mnist':
        if data_dir is None:
            raise ValueError('--data mnist needs --data-dir with the IDX .gz files')
        return load_mnist(data_dir)
    raise ValueError(f'unknown data set {name!r}; expected digits or mnist')
