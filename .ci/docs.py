"""Builds the API reference with pdoc into out/docs (or the folder given); warnings are errors.

    pip install -e ".[docs]" && python .ci/docs.py && python -m webbrowser out/docs/index.html
"""

import pathlib
import sys
import warnings

import pdoc
import pdoc.render

MODULES = ('normlib', 'normlib.linen', 'normlib.nnx', 'normlib.precise_flax',
           'normlib.torch_interop')


def main(argv):
    out = pathlib.Path(argv[0] if argv else 'out/docs')
    warnings.simplefilter('error')
    # The Linen modules' default initializers are JAX's functions, whose
    # annotations name types of JAX's own modules that pdoc cannot resolve.
    warnings.filterwarnings(
        'ignore', r'Error parsing type annotation .* for normlib\.linen\.\w+\.(bias|scale)_init')
    pdoc.render.configure(docformat='restructuredtext', math=True,
                          footer_text='normlib API reference')
    pdoc.pdoc(*MODULES, output_directory=out)
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob('*.html'))
    print(f'wrote {len(pages)} pages to {out}: {", ".join(pages)}')


if __name__ == '__main__':
    main(sys.argv[1:])
