"""Builds the API reference and the guides with pdoc into out/docs (or the folder given).

    pip install -e ".[docs]" && python .ci/docs.py && python -m webbrowser out/docs/index.html

Warnings are errors. The pages need no network: formulas are rendered to
MathML here (latex2mathml), which browsers draw natively.

- API pages: every public module. Docstrings are Google style with
  reStructuredText markup; doctest examples become code blocks.
- Guides: ``docs/*.md`` (Markdown), rendered with the same templates and
  linked from ``index.html`` (``docs/index.md``). Their images are embedded.
"""

import contextlib
import functools
import importlib
import os
import pathlib
import re
import sys
import textwrap
import types
import warnings

import latex2mathml.converter
import pdoc
import pdoc.doc
import pdoc.docstrings
import pdoc.render

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'

MODULES = ('normlib', 'normlib.linen', 'normlib.nnx', 'normlib.keras', 'normlib.equinox',
           'normlib.precise_flax', 'normlib.torch_interop')
# (page, title): docs/<page>.md becomes guide/<page>.html.
GUIDES = (
    ('migrating', 'Moving a model over from Flax, Keras or Equinox'),
    ('exact', 'What "exact" means'),
    ('devices', 'What crosses devices'),
)

# Annotations as Python prints them, and as users write them.
PUBLIC_NAMES = (
    ('jax.jaxlib._jax.Array', 'jax.Array'),
    ('Union[str, type[Any], numpy.dtype, jax._src.typing.SupportsDType, Any, NoneType]',
     'flax.typing.Dtype | None'),
    ('Union[str, type[Any], numpy.dtype, jax._src.typing.SupportsDType, Any]',
     'flax.typing.Dtype'),
    ("<class 'jax.numpy.float32'>", 'jax.numpy.float32'),
    ('equinox.nn._stateful.StateIndex', 'equinox.nn.StateIndex'),
    ('flax.linen.module.Module', 'flax.linen.Module'),
)


# ---------------------------------------------------------------- docstrings

_FENCE = re.compile(r'^[ \t]*```.*?^[ \t]*```[ \t]*$', re.M | re.S)


def _outside_code(text, fn):
    """``fn`` applied to the parts of Markdown ``text`` outside fenced code."""
    parts, last = [], 0
    for m in _FENCE.finditer(text):
        parts += [fn(text[last:m.start()]), m.group(0)]
        last = m.end()
    return ''.join(parts + [fn(text[last:])])


def _fence_doctests(text):
    """Doctest sessions (``>>>`` runs up to a blank line) as fenced ``pycon`` blocks."""
    lines, out, i = text.split('\n'), [], 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith('>>>'):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][:len(lines[i]) - len(stripped)]
        if out and out[-1].strip():
            out.append('')
        out.append(indent + '```pycon')
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            out.append(lines[i])
            i += 1
        out += [indent + '```', '']
    return '\n'.join(out)


def _example_sections(text):
    """Google ``Example:`` sections as a heading and their own paragraphs and
    code (pdoc would quote them as one block)."""
    def section(m):
        body = textwrap.dedent(m.group('body')).strip('\n')
        return f'\n###### {m.group("name")}:\n\n{body}\n'
    return re.sub(r'^(?P<name>Examples?):\n(?P<body>(?:[ \t]*\n|[ \t]+.+\n?)+)', section,
                  text, flags=re.M)


def _mathml(latex, display):
    mathml = latex2mathml.converter.convert(' '.join(latex.split()), display=display)
    # Text inside the tags must not read as Markdown emphasis or code.
    return re.sub(r'>([^<]+)<', lambda m: '>' + re.sub(
        r'[*_`\\\[\]]', lambda c: f'&#x{ord(c.group(0)):04X};', m.group(1)) + '<', mathml)


def _render_math(markdown, markdown_page):
    """``$$...$$`` (pdoc's form of ``.. math::``) and ``\\( ... \\)`` (of
    ``:math:``) as MathML; ``$...$`` too in Markdown pages."""
    def inline(m):  # in a span: MathML at the start of a line would end the paragraph
        return '<span class="math">' + _mathml(m.group(1), 'inline') + '</span>'

    def convert(text):
        text = re.sub(r'\$\$(.+?)\$\$', lambda m: '\n\n' + _mathml(m.group(1), 'block') + '\n\n',
                      text, flags=re.S)
        text = re.sub(r'\\\\\((.+?)\\\\\)', inline, text, flags=re.S)
        if markdown_page:
            text = re.sub(r'(?<![\w$\\])\$([^$\s](?:[^$\n]*[^$\s])?)\$(?![\w$])', inline, text)
        return text
    return _outside_code(markdown, convert)


_pdoc_convert = pdoc.docstrings.convert


@functools.cache
def convert(docstring, docformat, source_file):
    """pdoc's conversion to Markdown, with doctests as code and math as MathML.

    normlib's docstrings are Google style with reST markup (``code``,
    ``:func:``, ``.. math::``); the guides (``__docformat__ = 'markdown'``)
    are Markdown already.
    """
    if docformat != 'markdown':
        docstring = re.sub(r'(?<=`)\\ ', '', docstring)  # reST's "``psum``\ s"
        docstring = _fence_doctests(_example_sections(docstring))
    return _render_math(_pdoc_convert(docstring, docformat, source_file),
                        docformat == 'markdown')


_pdoc_tidy_annotation = pdoc.doc._remove_collections_abc


def _public_annotation(text):
    """pdoc's tidying of every annotation and signature, plus ``PUBLIC_NAMES``."""
    text = _pdoc_tidy_annotation(text)
    for private, public in PUBLIC_NAMES:
        text = text.replace(private, public)
    return text


def _public_path(cls):
    """Where users import ``cls`` from (``keras.layers.BatchNormalization``, not
    ``keras.src.layers...``), or None: its module path without private parts,
    shortest prefix first."""
    parts = [p for p in cls.__module__.split('.') if not p.startswith('_') and p != 'src']
    for i in range(1, len(parts) + 1):
        module = sys.modules.get('.'.join(parts[:i]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f'{module.__name__}.{cls.__qualname__}'
    return None


def public_bases(doc):
    """A class's bases (pdoc's ``(module, qualname, text)``) as users know them:
    public names, and a private base replaced by its own public bases."""
    found = []

    def add(cls):
        for base in cls.__bases__:
            path = None if base.__name__.startswith('_') else _public_path(base)
            if base is object or any(f[2] == path for f in found):
                continue
            if path is None:
                add(base)
            else:
                found.append((base.__module__, base.__qualname__, path))

    for module, qualname, text in doc.bases:
        base = sys.modules.get(module)
        for name in qualname.split('.'):
            base = getattr(base, name, None)
        documented = module in MODULES and not qualname.startswith('_')
        if documented or module == 'typing' or not isinstance(base, type):
            found.append((module, qualname, text))
        elif (path := _public_path(base)) and not base.__name__.startswith('_'):
            found.append((module, qualname, path))
        else:
            add(base)
    return found


@contextlib.contextmanager
def _normlib_conversions():
    """pdoc with ``convert`` and ``_public_annotation`` in place of its own."""
    saved = pdoc.docstrings.convert, pdoc.doc._remove_collections_abc
    pdoc.docstrings.convert, pdoc.doc._remove_collections_abc = convert, _public_annotation
    try:
        yield
    finally:
        pdoc.docstrings.convert, pdoc.doc._remove_collections_abc = saved


# ---------------------------------------------------------------- pages

def _page(name, markdown_file, title):
    """A page rendered from a Markdown file, as pdoc renders a module."""
    module = types.ModuleType(name, markdown_file.read_text())
    module.__file__ = str(markdown_file)  # images are embedded from beside it
    module.__docformat__ = 'markdown'
    module.__all__ = []
    module.normlib_page_title = title
    return pdoc.doc.Module(module)


def build(out):
    """Writes every page to ``out``; returns the pages' paths relative to it."""
    out = pathlib.Path(out)
    for name in MODULES:  # here, not under pdoc's import guard, which stops Keras's subprocesses
        importlib.import_module(name)
    all_modules = {name: pdoc.doc.Module.from_name(name) for name in MODULES}
    all_modules['index'] = _page('index', DOCS / 'index.md', 'normlib')
    for page, title in GUIDES:
        all_modules[f'guide.{page}'] = _page(f'guide.{page}', DOCS / f'{page}.md', title)
    pdoc.render.env.globals['normlib_guides'] = [
        (f'guide/{page}.html', title) for page, title in GUIDES]
    for name, module in all_modules.items():
        path = out / f'{name.replace(".", "/")}.html'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pdoc.render.html_module(module, all_modules))
    (out / 'search.js').write_text(pdoc.render.search_index(all_modules))
    return sorted(p.relative_to(out).as_posix() for p in out.rglob('*.html'))


def main(argv):
    out = pathlib.Path(argv[0] if argv else 'out/docs')
    os.environ.setdefault('KERAS_BACKEND', 'jax')  # before normlib.keras imports Keras
    warnings.simplefilter('error')
    pdoc.render.env.filters['public_bases'] = public_bases
    pdoc.render.configure(docformat='google', math=False, template_directory=DOCS / 'templates',
                          footer_text='normlib API reference')
    with _normlib_conversions():
        pages = build(out)
    print(f'wrote {len(pages)} pages to {out}: {", ".join(pages)}')


if __name__ == '__main__':
    main(sys.argv[1:])
