"""Build the docs site from the notebooks into `_docs/`, offline, with or without Quarto (run as `.ci/docs`).

With `quarto` on PATH this is nbdev's own `nbdev_docs`, as the GitHub workflow publishes it. Without Quarto:

1. nbdev processes the notebooks into `_proc/` exactly as it does for Quarto (`nbdev.serve.proc_nbs`:
   front matter from the title cell, `show_doc` cells executed and marked `#| echo: false`, hidden cells
   dropped, names in backticks linked to their docs). It installs nothing and never writes
   `nbs/sidebar.yml`: that is `nbdev_sidebar`, which `nbdev_proc_nbs --force` runs too (its `force` reaches
   the sidebar and overrides `custom_sidebar = True`), so the build calls `proc_nbs` itself and, as a
   guard, puts back any file it must leave alone (`KEPT`) if something rewrote it.
2. Each processed notebook becomes Pandoc Markdown the way Quarto turns a notebook into Markdown: Markdown
   cells as they are; code cells as ```python blocks honouring the cell options `echo`, `output` and
   `include`; outputs as `.cell-output` blocks, `text/markdown` as Markdown (`show_doc`), PNG/JPEG/SVG as
   image files.
3. Debian's `pandoc` (the Markdown dialect of Quarto, so headings get the anchors nbdev's doc links point
   at) renders each page into a template with the sections of `nbs/sidebar.yml` as navigation and a table
   of contents; KaTeX renders the math in the browser from local files (Debian's `libjs-katex`, copied
   into `_docs/katex/`).
4. Links are made to work offline: `02_layers.ipynb#anchor` -> `layers.html#anchor` (the page's
   `output-file`), links into the published site (`doc_host` + `doc_baseurl`) become relative, and local
   files that pages link to or show are copied next to them.
"""
import base64
import html
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS, DOCS = ROOT / 'nbs', ROOT / '_docs'
# Debian's libjs-katex (its fonts/ links to fonts-katex); elsewhere KATEX_DIR=.../katex/dist (npm's katex)
KATEX = Path(os.environ.get('KATEX_DIR', '/usr/share/javascript/katex'))
KEPT = ['nbs/sidebar.yml', 'nbs/_quarto.yml', 'README.md']  # nbdev can rewrite these; the build must not
INSTALL_HINT = 'apt-get update && apt-get install -y pandoc libjs-katex'
_directive = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_ansi = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


@contextmanager
def kept(paths=KEPT, root=ROOT):
    "Restore the files at `paths` (relative to `root`) afterwards if anything in the block changed them"
    before = {p: (root / p).read_bytes() for p in paths if (root / p).exists()}
    try: yield
    finally:
        for p, data in before.items():
            if not (root / p).exists() or (root / p).read_bytes() != data:
                (root / p).write_bytes(data)
                print(f'docs: {p} was rewritten during the build; restored', file=sys.stderr)


def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')


def split_directives(src):
    "Cell options (`#| key: value` lines at the top, values read as YAML) and the code below them"
    lines, opts, i = src.splitlines(), {}, 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith('#|')):
        m = _directive.match(lines[i])
        if m: opts[m.group(1)] = yaml.safe_load(m.group(2)) if m.group(2) else None
        i += 1
    return opts, '\n'.join(lines[i:]).strip('\n')


def fenced(text, cls=''):
    "`text` as a fenced code block (of class `cls`) whose fence is longer than any backtick run inside"
    fence = '`' * max(3, 1 + max((len(r) for r in re.findall(r'`+', text)), default=0))
    return f'{fence}{cls}\n{text}\n{fence}'


def _div(cls, body): return f'::: {{{cls}}}\n{body}\n:::'


def front_matter(nb, stem):
    "The page's front matter (title, description, output-file) from the raw cell nbdev puts first"
    raws = [c for c in nb['cells']
            if c['cell_type'] == 'raw' and _text(c['source']).lstrip().startswith('---')]
    fm = yaml.safe_load(_text(raws[0]['source']).strip().strip('-')) if raws else None
    fm = fm if isinstance(fm, dict) else {}
    fm.setdefault('title', stem)
    fm.setdefault('output-file', stem + '.html')
    return fm


class Page:
    "One processed notebook turned into Pandoc Markdown, and the image files its outputs hold"
    def __init__(self, path):
        self.path, self.nb = Path(path), json.loads(Path(path).read_text(encoding='utf-8'))
        self.fm = front_matter(self.nb, self.path.stem)
        self.html = self.fm['output-file']          # file name in _docs/, e.g. 'layers.html'
        self.title = str(self.fm['title'])
        self.files = {}                             # relative path in _docs/ -> bytes of an output image
        self.markdown = self._markdown()

    def _output(self, out, cell_no, out_no, asis=False):
        "Markdown of one output of code cell `cell_no`; with `asis` a Markdown output goes in as it is"
        kind = out['output_type']
        if kind == 'stream':
            text = _ansi.sub('', _text(out['text'])).rstrip('\n')
            return _div(f'.cell-output .cell-output-{out["name"]}', fenced(text)) if text.strip() else ''
        if kind == 'error':
            trace = _ansi.sub('', '\n'.join(out['traceback']))
            return _div('.cell-output .cell-output-error', fenced(trace))
        data = out.get('data', {})
        for mime, ext in [('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/svg+xml', 'svg')]:
            if mime in data:
                name = f'{Path(self.html).stem}_files/figure-html/cell-{cell_no}-output-{out_no}.{ext}'
                raw = _text(data[mime])
                self.files[name] = raw.encode() if ext == 'svg' else base64.b64decode(raw)
                return _div('.cell-output .cell-output-display', f'![]({name})')
        if 'text/markdown' in data and asis: return _text(data['text/markdown'])
        if 'text/markdown' in data: body = _text(data['text/markdown'])
        elif 'text/html' in data: body = fenced(_text(data['text/html']), '{=html}')
        elif 'text/latex' in data: body = _text(data['text/latex'])
        elif 'text/plain' in data: body = fenced(_text(data['text/plain']))
        else: return ''
        return _div('.cell-output .cell-output-display', body)

    def _code_cell(self, cell, cell_no):
        "Markdown of a code cell, honouring the cell options Quarto honours"
        opts, code = split_directives(_text(cell['source']))
        if opts.get('include') is False: return ''
        show_code = opts.get('echo') is not False and code.strip()
        parts = [fenced(code, ' {.python .cell-code}')] if show_code else []
        if opts.get('output') is not False:  # `output: asis` (show_doc's cells): Markdown outputs unwrapped
            outs = [self._output(o, cell_no, i, asis=opts.get('output') == 'asis')
                    for i, o in enumerate(cell.get('outputs', []), 1)]
            parts += [o for o in outs if o]
        if opts.get('output') == 'asis' and opts.get('echo') is False:  # top level: headings reach the TOC
            return '\n\n'.join(parts)
        return _div('.cell', '\n\n'.join(parts)) if parts else ''

    def _markdown(self):
        "The page as Pandoc Markdown: front matter, then the cells"
        meta = {k: self.fm[k] for k in ('title', 'description') if self.fm.get(k)}
        parts, code_no = ['---\n' + yaml.safe_dump(meta, allow_unicode=True, width=1000) + '---'], 0
        for cell in self.nb['cells']:
            src = _text(cell['source'])
            if cell['cell_type'] == 'markdown': parts.append(src)
            elif cell['cell_type'] == 'code':
                code_no += 1
                parts.append(self._code_cell(cell, code_no))
            elif cell['cell_type'] == 'raw' and cell.get('metadata', {}).get('format') == 'text/html':
                parts.append(fenced(src, '{=html}'))
        return '\n\n'.join(p.strip('\n') for p in parts if p.strip()) + '\n'


def sidebar(pages_by_nb, current, sidebar_yml=NBS / 'sidebar.yml'):
    "Navigation HTML from the sections of `sidebar.yml`, `current` (an output file name) marked"
    def item(entry):
        if isinstance(entry, str):
            page = pages_by_nb.get(entry)
            if page is None: return f'<li class="missing">{html.escape(entry)} (no such notebook)</li>'
            cls = ' class="active"' if page.html == current else ''
            return f'<li><a href="{page.html}"{cls}>{html.escape(page.title)}</a></li>'
        if 'section' in entry:
            inner = ''.join(item(e) for e in entry.get('contents', []))
            name = html.escape(str(entry['section']))
            return f'<li class="section"><span>{name}</span><ul>{inner}</ul></li>'
        href = entry.get('href', '')
        href = pages_by_nb[href].html if href in pages_by_nb else href
        return f'<li><a href="{html.escape(href)}">{html.escape(str(entry.get("text", href)))}</a></li>'
    contents = yaml.safe_load(sidebar_yml.read_text())['website']['sidebar']['contents']
    return '<ul>' + ''.join(item(e) for e in contents) + '</ul>'


def fix_links(page_html, nb_map, doc_url, base='', nbs=NBS, docs=DOCS):
    "Point links and images at the offline site: notebooks -> pages, the published site -> relative"
    def fix(m):  # base: the notebook's folder in nbs/, which its relative links start from
        attr, url = m.group(1), html.unescape(m.group(2))
        if doc_url and url.startswith(doc_url): url = url[len(doc_url):] or 'index.html'
        elif not re.match(r'^[a-z][a-z0-9+.-]*:|^#|^/', url):
            path, sep, anchor = url.partition('#')
            rel = posixpath.normpath(posixpath.join(base, unquote(path))) if path else ''
            if rel in nb_map: url = nb_map[rel] + sep + anchor
            elif rel and not rel.startswith('..') and (nbs / rel).is_file():  # a file it links to or shows
                (docs / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(nbs / rel, docs / rel)
                url = rel + sep + anchor
        return f'{attr}="{html.escape(url)}"'
    return re.sub(r'\b(href|src)="([^"]*)"', fix, page_html)


TEMPLATE = '''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$pagetitle$ – $sitetitle$</title>
<style>
$highlighting-css$
</style>
<link rel="stylesheet" href="site.css">
<link rel="stylesheet" href="styles.css">
$math$
</head>
<body>
<header class="navbar"><a href="index.html">$sitetitle$</a><span>$sitedescription$</span></header>
<div class="layout">
<nav class="sidebar" aria-label="chapters"><!--sidebar--></nav>
<main id="content">
<header id="title-block-header">
<h1 class="title">$title$</h1>
$if(description)$<div class="description">$description$</div>$endif$
</header>
$body$
</main>
<nav id="TOC" class="toc" aria-label="on this page"><h2>On this page</h2>
$table-of-contents$
</nav>
</div>
</body>
</html>
'''

SITE_CSS = '''/* layout of the offline docs site (.ci/docs); nbs/styles.css is loaded after it */
body { margin: 0; font: 16px/1.55 system-ui, "Segoe UI", Roboto, sans-serif; color: #212529; }
a { color: #2761b0; text-decoration: none; } a:hover { text-decoration: underline; }
.navbar { background: #2780e3; padding: .6rem 1.2rem; display: flex; gap: 1.2rem; align-items: baseline; }
.navbar a { color: #fff; font-weight: 600; font-size: 1.15rem; }
.navbar span { color: #e6f0fb; font-size: .85rem; }
.layout { display: grid; grid-template-columns: 15rem minmax(0, 1fr) 14rem; gap: 2rem; padding: 0 1rem; }
.sidebar, .toc { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto;
  font-size: .9rem; padding-top: 1.5rem; }
.sidebar ul, .toc ul { list-style: none; padding-left: .8rem; margin: .2rem 0; }
.sidebar > ul { padding: 0; }
.sidebar .section > span { font-weight: 600; display: block; margin-top: .6rem; }
.sidebar a.active { font-weight: 600; color: #000; } .sidebar .missing { color: #b00; }
.toc h2 { font-size: .9rem; margin: 0 0 .3rem; } .toc > ul { padding-left: 0; }
main { min-width: 0; padding: 1rem 0 4rem; max-width: 56rem; }
h1.title { margin-bottom: .3rem; }
pre { background: #f7f7f7; padding: .6rem .8rem; overflow-x: auto; border-radius: 4px; font-size: .85rem; }
code { font-size: .9em; }
p code, li code, td code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .6rem; }
img { max-width: 100%; } .katex-display { overflow-x: auto; overflow-y: hidden; }
@media (max-width: 1100px) {
  .layout { grid-template-columns: 13rem minmax(0, 1fr); }
  .toc { display: none; }
}
'''


def _pandoc(markdown, template, site_title, site_description):
    "One page's HTML from its Markdown"
    cmd = ['pandoc', '--from=markdown', '--to=html5', '--standalone', f'--template={template}', '--toc',
           '--toc-depth=3', '--katex=katex/', '--highlight-style=pygments', '--wrap=none',
           '-V', f'sitetitle={site_title}', '-V', f'sitedescription={site_description}']
    return subprocess.run(cmd, input=markdown, capture_output=True, text=True, check=True).stdout


def missing_tools():
    "What the build without Quarto lacks on this machine, as a list of descriptions"
    need = [] if shutil.which('pandoc') else ['pandoc']
    if not (KATEX / 'katex.min.js').exists() or not (KATEX / 'fonts').is_dir():
        need.append(f'KaTeX in {KATEX}')
    return need


def _copy_katex(dest):
    "KaTeX's script, style sheet and woff2 fonts (the format every current browser takes first)"
    (dest / 'fonts').mkdir(parents=True, exist_ok=True)
    for f in ['katex.min.js', 'katex.min.css']: shutil.copy2(KATEX / f, dest / f)
    for f in (KATEX / 'fonts').glob('*.woff2'): shutil.copy2(f, dest / 'fonts' / f.name)


def process_notebooks():
    "nbdev's processing of every notebook into `_proc/` (no Quarto, no install, no sidebar); its folder"
    from nbdev.serve import proc_nbs
    try:
        with kept(): return Path(proc_nbs(force=True))
    except Exception as e:  # a notebook whose export or show_doc cells failed: name it, not the traceback
        sys.exit(f'docs: nbdev could not process the notebooks: {str(e).strip()}')


def notebooks(nbs=NBS):
    "The notebooks nbdev documents: paths relative to `nbs`, skipping names that start with '.' or '_'"
    return sorted(p.relative_to(nbs).as_posix() for p in nbs.rglob('*.ipynb')
                  if not any(part.startswith(('.', '_')) for part in p.relative_to(nbs).parts))


def sidebar_notebooks(sidebar_yml=NBS / 'sidebar.yml'):
    "Every notebook that `sidebar.yml` names"
    def walk(entries):
        for e in entries:
            if isinstance(e, str): yield e
            elif 'contents' in e: yield from walk(e['contents'])
            else: yield e.get('href')
    return [n for n in walk(yaml.safe_load(sidebar_yml.read_text())['website']['sidebar']['contents']) if n]


def build_pandoc(docs=DOCS, workers=2):
    "The site in `docs` from the notebooks, rendered with Pandoc; returns the pages"
    from nbdev.config import get_config
    cfg, t0 = get_config(), time.perf_counter()
    doc_url = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/') + '/'
    proc, names = process_notebooks(), notebooks()
    if missing := [n for n in names if not (proc / n).exists()]:
        sys.exit(f'docs: nbdev did not process {missing}')
    pages = {n: Page(proc / n) for n in names}
    nb_map = {n: p.html for n, p in pages.items()}
    if len(set(nb_map.values())) < len(nb_map):
        sys.exit(f'docs: two notebooks make the same page: {nb_map}')
    if unlisted := sorted(set(names) - set(sidebar_notebooks())):
        print(f'docs: not in nbs/sidebar.yml, so built but not in the navigation: {unlisted}')
    t1 = time.perf_counter()
    shutil.rmtree(docs, ignore_errors=True)
    docs.mkdir(parents=True)
    _copy_katex(docs / 'katex')
    (docs / 'site.css').write_text(SITE_CSS)
    shutil.copy2(NBS / 'styles.css', docs / 'styles.css')
    title, description = html.escape(cfg.get('title', cfg.lib_name)), html.escape(cfg.get('description', ''))
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / 'page.html'
        template.write_text(TEMPLATE)
        with ThreadPoolExecutor(workers) as pool:  # one pandoc process per page
            rendered = list(pool.map(lambda p: _pandoc(p.markdown, template, title, description),
                                     pages.values()))
    for (name, page), text in zip(pages.items(), rendered):
        for path, data in page.files.items():
            (docs / path).parent.mkdir(parents=True, exist_ok=True)
            (docs / path).write_bytes(data)
        text = fix_links(text.replace('<!--sidebar-->', sidebar(pages, page.html)), nb_map, doc_url,
                         base=posixpath.dirname(name), docs=docs)
        (docs / page.html).write_text(text, encoding='utf-8')
    t2 = time.perf_counter()
    print(f'docs: {len(pages)} pages: nbdev processing {t1 - t0:.1f} s, pandoc {t2 - t1:.1f} s')
    return list(pages.values())


def build_quarto():
    "nbdev's own build with Quarto (what the GitHub workflow publishes)"
    with kept(): subprocess.run(['nbdev_docs'], cwd=ROOT, check=True)


def build(renderer=None):
    "Build `_docs/` with `renderer` ('quarto' or 'pandoc'; default: Quarto if on PATH); returns seconds"
    t0 = time.perf_counter()
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    renderer = renderer or ('quarto' if shutil.which('quarto') else 'pandoc')
    if renderer == 'quarto': build_quarto()
    else:
        if need := missing_tools(): sys.exit(f'docs: missing {", ".join(need)}: {INSTALL_HINT}')
        build_pandoc()
    return time.perf_counter() - t0
