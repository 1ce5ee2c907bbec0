"""The docs site: built offline from the notebooks (`.ci/docs`) and opened page by page in headless Chromium.

The checker's own tests load small hand-made pages, each broken in one of the ways the checker looks for;
the site test builds the whole site and fails on anything broken, naming the page. Without Chromium (Debian:
`apt-get install -y chromium`, which .ci/run does) the browser tests skip and say so.
"""
import base64
import html
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _module(name):
    "The module .ci/`name`.py"
    spec = importlib.util.spec_from_file_location(name, ROOT / '.ci' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


docs_build, docs_check = _module('docs_build'), _module('docs_check')
needs_chromium = pytest.mark.skipif(
    docs_check.find_chromium() is None,
    reason='chromium not found: the docs are checked in Debian chromium '
           '(apt-get update && apt-get install -y chromium; .ci/run installs it where it can)')
PNG = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLv'
                       'AAAAAElFTkSuQmCC')  # one pixel


# The build's pieces, no browser needed

def test_cell_options_decide_what_a_code_cell_shows(tmp_path):
    "echo: false hides the code, output: false the outputs, include: false both; directives are not shown"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_raw_cell('---\ntitle: A page\noutput-file: a.html\n---'),
                nbformat.v4.new_code_cell('#| echo: false\nhidden_code = 1'),
                nbformat.v4.new_code_cell('#| output: false\nshown_code = 2'),
                nbformat.v4.new_code_cell('#| include: false\nleft_out = 3'),
                nbformat.v4.new_code_cell('#| eval: false\nnot_run = 4')]
    nb.cells[1].outputs = [nbformat.v4.new_output('stream', text='output of hidden code\n')]
    nb.cells[2].outputs = [nbformat.v4.new_output('stream', text='hidden output\n')]
    nbformat.write(nb, tmp_path / 'a.ipynb')
    page = docs_build.Page(tmp_path / 'a.ipynb')
    md = page.markdown
    assert (page.title, page.html) == ('A page', 'a.html')
    assert 'output of hidden code' in md and 'hidden_code' not in md
    assert 'shown_code = 2' in md and 'hidden output' not in md
    assert 'left_out' not in md and 'not_run = 4' in md and '#|' not in md


def test_outputs_become_markdown_images_and_code(tmp_path):
    "show_doc's Markdown goes in as it is, a PNG becomes an image file, text a code block"
    nb = nbformat.v4.new_notebook()
    doc = nbformat.v4.new_code_cell('#| echo: false\n#| output: asis\nshow_doc(f)')
    doc.outputs = [nbformat.v4.new_output('execute_result', {'text/markdown': '### f\n\n*Docs of f*',
                                                             'text/plain': '<f>'})]
    plot = nbformat.v4.new_code_cell('plt.plot()')
    plot.outputs = [nbformat.v4.new_output('display_data', {'image/png': base64.b64encode(PNG).decode(),
                                                            'text/plain': '<Figure>'}),
                    nbformat.v4.new_output('execute_result', {'text/plain': "'a ``` inside'"})]
    nb.cells = [doc, plot]
    nbformat.write(nb, tmp_path / '05_x.ipynb')
    page = docs_build.Page(tmp_path / '05_x.ipynb')
    assert '### f\n\n*Docs of f*' in page.markdown and 'show_doc' not in page.markdown
    assert page.files == {'05_x_files/figure-html/cell-2-output-1.png': PNG}
    assert '![](05_x_files/figure-html/cell-2-output-1.png)' in page.markdown
    assert "````\n'a ``` inside'\n````" in page.markdown  # the fence outgrows the backticks inside


def test_links_point_at_the_offline_pages(tmp_path):
    "Notebook links go to their pages, links into the published site become relative, used files are copied"
    nbs, docs = tmp_path / 'nbs', tmp_path / 'docs'
    (nbs / 'results').mkdir(parents=True)
    (nbs / 'results' / 'r.json').write_text('{}')
    docs.mkdir()
    links = ['02_layers.ipynb#solvestats', 'https://x.io/p/linear.html#prox_linear', 'https://x.io/p/',
             'results/r.json', 'https://pytorch.org', 'missing.ipynb']
    page = ' '.join(f'<a href="{link}">{i}</a>' for i, link in enumerate(links))
    nb_map = {'02_layers.ipynb': 'layers.html'}
    out = docs_build.fix_links(page, nb_map, 'https://x.io/p/', nbs=nbs, docs=docs)
    fixed = ['layers.html#solvestats', 'linear.html#prox_linear', 'index.html', 'results/r.json',
             'https://pytorch.org', 'missing.ipynb']
    assert out == ' '.join(f'<a href="{link}">{i}</a>' for i, link in enumerate(fixed))
    assert (docs / 'results' / 'r.json').read_text() == '{}'


def test_kept_files_are_restored(tmp_path):
    "A file the build must not change (nbs/sidebar.yml) is put back if something rewrote it"
    (tmp_path / 'sidebar.yml').write_text('sections\n')
    with docs_build.kept(['sidebar.yml'], root=tmp_path):
        (tmp_path / 'sidebar.yml').write_text('flat list\n')
    assert (tmp_path / 'sidebar.yml').read_text() == 'sections\n'


# The checker, on small pages each broken in one way

def _html(body):
    "A page whose main content is `body`"
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>T</title></head><main>{body}</main>'


@pytest.fixture(scope='module')
def checked(tmp_path_factory):
    "Hand-made pages checked in Chromium: {page name: its problems}, and the report"
    docs = tmp_path_factory.mktemp('site')
    (docs / 'plot.png').write_bytes(PNG)
    (docs / 'bad.png').write_bytes(b'not a png')
    text = '<p>Enough words on this page for it to count as a page with content.</p>'
    pages = {
        'good.html': f'<h2 id="sec">Sec</h2>{text}<a href="#sec">here</a> <a href="other.html#end">a</a> '
                     '<a href="https://example.org">b</a><img src="plot.png"><code>$x^2$ #| show_doc(</code>'
                     '<p>It costs $5 or $10.</p>',
        'other.html': f'{text}<p id="end">end</p>',
        'tex.html': f'{text}<p>The energy $x^2$ and $$\\frac{{a}}{{b}}$$</p><p>$x<em>1$ and $y</em>2$</p>',
        'mathspan.html': f'{text}<p><span class="math inline">\\tau_\\theta</span></p>',
        'anchor.html': f'{text}<a href="#nowhere">a</a> <a href="other.html#gone">b</a>',
        'link.html': f'{text}<a href="missing.html">a</a> <a href="02_layers.ipynb">b</a> '
                     '<a href="https://proxprop-nb.github.io/proxprop_nb/layers.html">c</a>',
        'image.html': f'{text}<img src="missing.png"><img src="bad.png">',
        'markdown.html': f'{text}<p>| a | b |\n|---|---|</p><p>[source](x.py){{target="_blank"}}</p>',
        'directive.html': f'{text}<pre>#| export\ndef f(): pass</pre>',
        'showdoc.html': f'{text}<pre>show_doc(ProxPropLinear)</pre>',
        'empty.html': '<header id="title-block-header"><h1>Only a title</h1></header>',
    }
    if not docs_build.missing_tools():  # KaTeX renders one formula and fails on another
        docs_build._copy_katex(docs / 'katex')
        math = '<span class="math inline">\\tau_\\theta</span> <span class="math inline">\\frac{a</span>'
        pages['katex.html'] = (
            f'{text}<p>{math}</p><link rel="stylesheet" href="katex/katex.min.css">'
            '<script src="katex/katex.min.js"></script><script>for (const m of document.querySelectorAll'
            '(".math")) katex.render(m.textContent, m, {throwOnError: false})</script>')
    for name, body in pages.items(): (docs / name).write_text(_html(body))
    report = docs_check.check_site(docs, doc_url='https://proxprop-nb.github.io/proxprop_nb/', verbose=False)
    return {k: v['problems'] for k, v in report['per_page'].items()}, report


@needs_chromium
def test_checker_passes_a_sound_page(checked):
    "Nothing is reported on a page whose links, anchor and image work (code may show anything)"
    problems, report = checked
    assert problems['good.html'] == [] and problems['other.html'] == []
    assert report['per_page']['good.html']['images'] == 1 and report['per_page']['good.html']['links'] == 3
    assert report['pages'] >= 11 and not report['ok']


@needs_chromium
@pytest.mark.parametrize('page, kinds, names', [
    ('tex.html', {'raw TeX'}, ['$x^2$', '$$', '\\frac', '$x1$ and $y2$']),
    ('mathspan.html', {'math not rendered'}, ['\\tau_\\theta']),
    ('anchor.html', {'broken anchor'}, ['#nowhere', 'other.html#gone']),
    ('link.html', {'broken link', 'link into the published site'},
     ['missing.html', '02_layers.ipynb', 'proxprop_nb/layers.html']),
    ('image.html', {'image did not load', 'failed to load'}, ['missing.png', 'bad.png']),
    ('markdown.html', {'raw Markdown'}, ['|---|', '](x.py)', '{target=']),
    ('directive.html', {'nbdev leftover'}, ['#| export']),
    ('showdoc.html', {'nbdev leftover'}, ['show_doc(ProxPropLinear)']),
    ('empty.html', {'empty page'}, []),
])
def test_checker_flags_a_broken_page(checked, page, kinds, names):
    "Each hand-made fault is found and named, and nothing else is reported"
    problems = checked[0][page]
    assert {p.split(':')[0].split(' (')[0] for p in problems} == kinds, problems
    assert all(any(n in p for p in problems) for n in names), problems


@needs_chromium
def test_checker_counts_rendered_math_and_finds_katex_errors(checked):
    "A formula KaTeX rendered counts as a math node; one it could not parse is a problem"
    problems, report = checked
    if 'katex.html' not in problems: pytest.skip(f'KaTeX not found: {docs_build.INSTALL_HINT}')
    assert report['per_page']['katex.html']['math'] == 1
    assert {p.split(':')[0] for p in problems['katex.html']} == {'KaTeX error', 'math not rendered'}
    assert all('\\frac{a' in p for p in problems['katex.html'])


# The whole site

@pytest.fixture(scope='module')
def site():
    "The site `.ci/docs` builds (nbdev_docs with Quarto, else Pandoc), and nbs/sidebar.yml before the build"
    if not docs_build.shutil.which('quarto') and (need := docs_build.missing_tools()):
        pytest.skip(f'the offline docs build needs {", ".join(need)}: {docs_build.INSTALL_HINT}')
    sidebar = (ROOT / 'nbs' / 'sidebar.yml').read_bytes()
    run = subprocess.run([sys.executable, str(ROOT / '.ci' / 'docs')], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f'.ci/docs failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}'
    return docs_build.DOCS, sidebar


def test_build_leaves_the_sidebar_alone(site):
    "nbs/sidebar.yml keeps its sections (nbdev_proc_nbs --force would flatten it into every file in nbs/)"
    assert (ROOT / 'nbs' / 'sidebar.yml').read_bytes() == site[1]


def test_navigation_follows_the_sidebar(site):
    "Every section and notebook of nbs/sidebar.yml is in the navigation of the index page"
    docs = site[0]
    if not (docs / 'site.css').exists(): pytest.skip('built by Quarto, which makes its own navigation')
    index = (docs / 'index.html').read_text()
    nav = index[index.index('<nav class="sidebar"'):index.index('</nav>')]
    contents = yaml.safe_load((ROOT / 'nbs' / 'sidebar.yml').read_text())['website']['sidebar']['contents']
    sections = [e['section'] for e in contents if isinstance(e, dict) and 'section' in e]
    assert sections and all(f'<span>{html.escape(s)}</span>' in nav for s in sections)
    assert 'class="missing"' not in nav
    assert nav.count('<a href=') == len(docs_build.sidebar_notebooks())


@needs_chromium
def test_every_page_works_in_a_browser(site):
    "No raw TeX, broken link or anchor, missing image, nbdev leftover or empty page on any page"
    report = docs_check.check_site(site[0])
    assert report['pages'] >= len(docs_build.notebooks()) and report['math'] > 0 and report['images'] > 0
    broken = {page: v['problems'] for page, v in report['per_page'].items() if v['problems']}
    assert not broken, json.dumps(broken, indent=1)
