"""The documentation: the guides' code runs as written, and the built pages
read as users see them (sections as lists, examples as code, formulas as
MathML, public type names, the state's field docs)."""

import html.parser
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
GUIDES = ('migrating', 'exact', 'devices')  # docs/<page>.md, linked from docs/index.md
MODULES = ('normlib', 'normlib.linen', 'normlib.nnx', 'normlib.keras', 'normlib.equinox',
           'normlib.precise_flax', 'normlib.torch_interop')
PYTHON_BLOCK = re.compile(r'^```python\n(.*?)^```', re.M | re.S)
CODE_BLOCK = r'<div class="pdoc-code codehilite">\s*<pre><span></span><code>'  # fenced, highlighted


def _env():
    """A fresh CPU process with 8 devices, Keras on JAX."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', KERAS_BACKEND='jax',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    return env


# Each ```python block runs in a fresh namespace, compiled at its offset in the
# page so that tracebacks name the page's own lines. The devices page needs 8
# devices: the session has 8 CPU devices (conftest.py); where it has not (a GPU
# session), the page runs in a fresh process that has.
RUNNER = r'''
import pathlib, re, sys
path = pathlib.Path(sys.argv[1])
text = path.read_text()
for i, m in enumerate(re.finditer(r'^```python\n(.*?)^```', text, re.M | re.S)):
    offset = text.count('\n', 0, m.start(1))
    print(f'--- block {i} (line {offset + 1})', flush=True)
    exec(compile('\n' * offset + m.group(1), str(path), 'exec'), {'__name__': '__main__'})
'''


def _blocks(page):
    """``(first line, code)`` of each ```python block of ``docs/<page>.md``."""
    text = (DOCS / f'{page}.md').read_text()
    return [(text.count('\n', 0, m.start(1)), m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_guides_have_code_and_are_linked():
    index = (DOCS / 'index.md').read_text()
    for page in GUIDES:
        assert f'(guide/{page}.html)' in index, page
        assert _blocks(page), page


def _has_8_cpu_devices():
    import jax
    return jax.default_backend() == 'cpu' and jax.device_count() >= 8


@pytest.mark.parametrize('page, index', [(page, i) for page in GUIDES
                                         for i in range(len(_blocks(page)))])
def test_guide_block_runs(page, index):
    path = DOCS / f'{page}.md'
    if page == 'devices' and not _has_8_cpu_devices():
        if index:
            pytest.skip('the devices page ran in a fresh process, at its block 0')
        run = subprocess.run([sys.executable, '-c', RUNNER, str(path)], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f'{path}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}'
        assert run.stdout.count('--- block ') == len(_blocks(page))
        return
    offset, code = _blocks(page)[index]
    exec(compile('\n' * offset + code, str(path), 'exec'), {'__name__': '__main__'})


# ---------------------------------------------------------------- the built pages

class _Text(html.parser.HTMLParser):
    """The text of a page, each piece with the elements it sits in."""

    VOID = {'br', 'img', 'input', 'meta', 'link', 'hr', 'wbr', 'mspace', 'source', 'col'}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.pieces = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if data.strip():
            self.pieces.append((data, frozenset(self.stack)))


def page_problems(name, page):
    """What in a page's HTML would not read as the docstrings mean."""
    parser = _Text()
    parser.feed(page)
    problems = []
    # Prose: what is not code, math or a section heading (pdoc's <h6>Returns:</h6>).
    prose = ' '.join(text if not ({'pre', 'code', 'math', 'script', 'style', 'h6'} & inside)
                    else ' '
                    for text, inside in parser.pieces)
    for m in re.finditer(r'(?<![\w.])(Args|Arguments|Returns|Attributes|Raises|Examples?):', prose):
        problems.append(f'{name}: a raw "{m.group(1)}:" section: {prose[m.start():m.end() + 60]!r}')
    for text, inside in parser.pieces:
        if '>>>' in text and 'pre' not in inside:
            problems.append(f'{name}: a doctest outside a code block: {text.strip()[:80]!r}')
    if re.search(r'<blockquote>\s*<blockquote>', page):  # ">>>" read as quote markers
        problems.append(f'{name}: doctest prompts rendered as nested quotes')
    for pattern in (r'\$\$', r'\\frac', r'\\\(', r':math:', r'\.\. math::'):
        for m in re.finditer(pattern, prose):
            problems.append(f'{name}: raw math: {prose[max(0, m.start() - 30):m.end() + 50]!r}')
    text = ''.join(t for t, _ in parser.pieces)
    for private in ('jaxlib._jax', 'jax._src'):
        if private in text:
            i = text.index(private)
            problems.append(f'{name}: a private type name: {text[max(0, i - 60):i + 40]!r}')
    if re.search(r'mathjax|cdn\.jsdelivr', page, re.I):
        problems.append(f'{name}: loads MathJax from the network')
    return problems


def _member_doc(page, ident):
    """The docstring text of the class member with HTML id ``ident``, or None."""
    m = re.search(rf'<div id="{re.escape(ident)}" class="classattr">(.*?)(?=<div id=|</section>)',
                  page, re.S)
    doc = m and re.search(r'<div class="docstring">(.*?)</div>', m.group(1), re.S)
    return re.sub(r'<[^>]+>', '', doc.group(1)).strip() if doc else None


def test_html_checks_can_fail():
    bad = ('<p>Args: x: the input. Returns: y.</p><p>Example: &gt;&gt;&gt; import normlib</p>'
           '<p>Example:</p><blockquote> <blockquote><p>import normlib</p></blockquote></blockquote>'
           '<p>$$y = \\frac{x}{2}$$</p><span>mean: jax.jaxlib._jax.Array</span>')
    problems = '\n'.join(page_problems('bad', bad))
    for expected in ('"Args:"', '"Returns:"', '"Example:"', 'doctest outside', 'nested quotes',
                     'raw math', 'private type name'):
        assert expected in problems, expected
    good = ('<h6>Arguments:</h6><ul><li><strong>x:</strong> the input.</li></ul>'
            '<pre><span>&gt;&gt;&gt; </span>import normlib</pre>'
            '<math display="block"><mfrac><mi>x</mi><mn>2</mn></mfrac></math>'
            '<span>mean: jax.Array</span>')
    assert page_problems('good', good) == []


def test_built_pages_read_as_users_see_them(tmp_path):
    pytest.importorskip('pdoc', reason='pdoc (the docs extra) is not installed')
    spec = importlib.util.spec_from_file_location('normlib_docs', REPO / '.ci' / 'docs.py')
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    out = tmp_path / 'docs'
    with warnings.catch_warnings():  # the build makes warnings errors
        docs.main([str(out)])
    pages = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob('*.html')}
    expected = ({f'{m.replace(".", "/")}.html' for m in MODULES} | {'index.html'}
                | {f'guide/{g}.html' for g in GUIDES})
    assert expected <= set(pages), sorted(expected - set(pages))

    problems = [p for name, page in sorted(pages.items()) for p in page_problems(name, page)]

    index = pages['index.html']
    for target in sorted(expected - {'index.html'}):
        if f'href="{target}' not in index:
            problems.append(f'index.html: no link to {target}')
    api = pages['normlib.html']
    if api.count('<math') < 5:
        problems.append(f'normlib.html: {api.count("<math")} MathML formulas, expected the '
                        'docstrings\' formulas')
    if not re.search(CODE_BLOCK + r'<span class="gp">&gt;&gt;&gt; ', api):
        problems.append('normlib.html: doctests are not highlighted code blocks')
    if not re.search(r'<h6[^>]*>Arguments:</h6>\s*<ul>', api):
        problems.append('normlib.html: Args sections are not lists')
    for field in ('mean', 'var', 'count'):
        doc = _member_doc(api, f'BatchNormState.{field}')
        if not doc or doc.startswith('Alias for field number'):
            problems.append(f'normlib.html: BatchNormState.{field} has no field doc ({doc!r})')
    for page in GUIDES:
        source = (DOCS / f'{page}.md').read_text()
        built = pages[f'guide/{page}.html']
        blocks = len(PYTHON_BLOCK.findall(source))
        if len(re.findall(CODE_BLOCK, built)) < blocks:
            problems.append(f'guide/{page}.html: fewer code blocks than the {blocks} in the source')
        for image in re.findall(r'!\[[^\]]*\]\(([^)]+)\)', source):
            if image in built or 'src="data:image/png;base64,' not in built:
                problems.append(f'guide/{page}.html: {image} is not embedded')
    assert not problems, '\n'.join(problems)
