"""Open every page of the built docs site in headless Chromium and report what a reader would find broken.

Chromium (Debian's `chromium`) is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no
port, no websocket, nothing but the standard library). Each page is loaded from its file, its scripts run
(KaTeX renders the math), and once its images and fonts have settled a script in the page reports:

- math: rendered KaTeX nodes; a `.math` element that KaTeX did not render, or a KaTeX error, is a problem;
- raw TeX left in the text outside math and code (`$$`, `\\(`, `\\frac`, `$x^2$`, ...), and raw Markdown
  (a pipe table, a `](link)` or a `{target=...}` attribute that did not render);
- images that did not load (naturalWidth 0) and any resource the page failed to load (scripts, fonts, CSS);
- links: each internal link must reach a file in the site, and its `#anchor` an element id in the target
  page; links still pointing at the published site, or at a notebook, are problems; external links are only
  counted;
- nbdev leftovers: `#|` directive lines or `show_doc(` calls shown as code or text;
- empty pages (no text below the title) and script errors.

`check_site()` prints a line per page and the totals, writes them to `_docs/check.json`, and returns them.
"""
import configparser
import fcntl
import html.parser
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / '_docs'
SKIP_DIRS = {'katex', 'site_libs'}  # asset folders of the two renderers, not pages
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--disable-extensions', '--disable-default-apps', '--mute-audio', '--window-size=1280,900']

# Runs in the page once it has loaded: waits for images and fonts, then measures. Text inside rendered math,
# code, scripts and styles is not prose; the rest is read per block (paragraph, item, cell, heading), so a
# `$x_1$` that Markdown split into emphasis is read whole. `pre` blocks are searched for nbdev leftovers.
PAGE_JS = r'''(async () => {
  const imgs = [...document.images];
  const settle = i => new Promise(r => { i.onload = i.onerror = r; });
  await Promise.all(imgs.filter(i => !i.complete).map(settle));
  await document.fonts.ready;
  const main = document.querySelector('main') || document.body;
  const header = main.querySelector('#title-block-header');
  const rawMd = /\|\s*:?-{3,}:?\s*\||\]\([^)\s]+\)|\{target=|\{[#.][\w-]+\}/;  // table, link, attributes
  // $$, \( \) \[ \], a TeX command, or $...$ with no space inside either dollar (what Pandoc takes as math)
  const rawTex = /\$\$|\\\(|\\\)|\\\[|\\\]|\\[A-Za-z]{2,}|\$[^$\s](?:[^$\n]*?[^$\s])?\$/;
  const notProse = 'script, style, pre, code, .katex, .math, .katex-error';
  const block = 'p, li, td, th, h1, h2, h3, h4, h5, h6, dt, dd, figcaption, blockquote, div, nav, header, '
              + 'body';
  const blocks = new Map(), walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest(notProse)) continue;
    const b = n.parentElement.closest(block);
    blocks.set(b, (blocks.get(b) || '') + n.data);
  }
  const prose = [...blocks.values()], pres = [...document.querySelectorAll('pre')].map(p => p.textContent);
  const snip = (s, i) => s.slice(Math.max(0, i - 40), i + 40).replace(/\s+/g, ' ');
  const found = (texts, re) => texts.flatMap(t => [...t.matchAll(new RegExp(re, re.flags + 'g'))]
                                                  .map(m => snip(t, m.index)));
  const mathTop = [...document.querySelectorAll('.katex')].filter(k => !k.parentElement.closest('.katex'));
  return {
    title: document.title,
    textChars: main.innerText.replace(header ? header.innerText : '', '').trim().length,
    math: mathTop.length,
    mathDisplay: document.querySelectorAll('.katex-display').length,
    unrendered: [...document.querySelectorAll('.math')].filter(m => !m.querySelector('.katex'))
                  .map(m => m.textContent.slice(0, 80)),
    katexErrors: [...document.querySelectorAll('.katex-error')].map(e => e.textContent.slice(0, 80)),
    rawTex: found(prose, rawTex),
    rawMarkdown: found(prose, rawMd),
    leftovers: [...found(pres, /^\s*#\|/m), ...found(prose, /#\|/),
                ...found(pres.concat(prose), /\bshow_doc\(/)],
    images: imgs.map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  };
})()'''


def find_chromium():
    "The Chromium executable on PATH, or None"
    names = ('chromium', 'chromium-browser', 'google-chrome')
    return next((path for name in names if (path := shutil.which(name))), None)


class Chromium:
    "Headless Chromium with a fresh profile, driven over the DevTools protocol on a pipe"
    def __init__(self, exe=None, timeout=30):
        self.exe, self.timeout = exe or find_chromium(), timeout  # timeout: seconds for one page or command
        if not self.exe: raise FileNotFoundError('chromium not found (Debian: apt-get install -y chromium)')
        self.profile = tempfile.mkdtemp(prefix='docs-check-chromium-')
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def on_fds_3_4():  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
            hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome, from_chrome)]
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)
        cmd = [self.exe, *CHROMIUM_FLAGS, f'--user-data-dir={self.profile}', '--remote-debugging-pipe',
               'about:blank']
        self.proc = subprocess.Popen(cmd, preexec_fn=on_fds_3_4, close_fds=False, start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self.events = b'', 0, []
        try:
            self.version = self.send('Browser.getVersion')['product']
            target = self.send('Target.createTarget', url='about:blank')['targetId']
            self.session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
            for domain in ('Page', 'Runtime', 'Network'): self.send(f'{domain}.enable', session=self.session)
        except BaseException:
            self.close()
            raise

    def _message(self, deadline):
        "The next message from Chromium"
        while b'\0' not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError('chromium did not answer in time')
            chunk = os.read(self._in, 1 << 20)
            if not chunk: raise ConnectionError('chromium closed the DevTools pipe (did it crash?)')
            self._buf += chunk
        msg, self._buf = self._buf.split(b'\0', 1)
        return json.loads(msg)

    def send(self, method, session=None, **params):
        "Run a DevTools command and return its result; events that arrive meanwhile go to `events`"
        self._id += 1
        msg = {'id': self._id, 'method': method, 'params': params}
        if session: msg['sessionId'] = session
        os.write(self._out, json.dumps(msg).encode() + b'\0')
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get('id') == self._id:
                if 'error' in reply: raise RuntimeError(f'{method}: {reply["error"]}')
                return reply['result']
            self.events.append(reply)

    def wait_for(self, method):
        "Wait for the event `method` of our page"
        deadline = time.monotonic() + self.timeout
        while not any(e.get('method') == method for e in self.events):
            self.events.append(self._message(deadline))

    def inspect(self, url):
        "Load `url` and return what PAGE_JS measured, plus the resources that failed and the script errors"
        self.events = []
        self.send('Page.navigate', session=self.session, url=url)
        self.wait_for('Page.loadEventFired')
        res = self.send('Runtime.evaluate', session=self.session, expression=PAGE_JS, awaitPromise=True,
                        returnByValue=True)
        if 'exceptionDetails' in res:
            raise RuntimeError(f'the page check failed on {url}: {res["exceptionDetails"]}')
        page = res['result']['value']
        requests = {e['params']['requestId']: e['params']['request']['url'] for e in self.events
                    if e.get('method') == 'Network.requestWillBeSent'}
        page['failedLoads'] = [f'{requests.get(e["params"]["requestId"], "?")}: {e["params"]["errorText"]}'
                               for e in self.events if e.get('method') == 'Network.loadingFailed']
        page['scriptErrors'] = [e['params']['exceptionDetails'].get('exception', {}).get('description', '')
                                or e['params']['exceptionDetails'].get('text', '')
                                for e in self.events if e.get('method') == 'Runtime.exceptionThrown']
        return page

    def close(self):
        "Quit Chromium and remove its profile"
        try: self.send('Browser.close')
        except (OSError, TimeoutError, RuntimeError, ConnectionError): pass
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired:  # its own process group: the browser and the helpers it started
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for fd in (self._in, self._out): os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()


class _Ids(html.parser.HTMLParser):
    "Element ids of an HTML file that was not opened in the browser"
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs): self.ids.update(v for k, v in attrs if k == 'id' and v)


def _doc_url(root=ROOT):
    "The published site's address from settings.ini (doc_host + doc_baseurl), or None"
    cfg = configparser.ConfigParser()
    if not cfg.read(root / 'settings.ini'): return None
    d = cfg['DEFAULT']
    if not d.get('doc_host'): return None
    return (d['doc_host'] + d.get('doc_baseurl', '')).rstrip('/') + '/'


def site_pages(docs=DOCS):
    "The HTML pages of the site in `docs`, asset folders left out"
    return sorted(p for p in docs.rglob('*.html') if not SKIP_DIRS & set(p.relative_to(docs).parts[:-1]))


def link_problems(pages, docs, doc_url=None):
    "Problems of the links in `pages` ({path: measured page}), and the counts of links checked"
    docs, ids = Path(docs).resolve(), {p: set(m['ids']) for p, m in pages.items()}
    problems, counts = {p: [] for p in pages}, {'internal': 0, 'anchors': 0, 'external': 0}
    for path, page in pages.items():
        for href in page['links']:
            url, frag = urldefrag(href)
            parsed = urlparse(url)
            if parsed.scheme != 'file':
                counts['external'] += 1
                if doc_url and href.startswith(doc_url):
                    problems[path].append(f'link into the published site: {href}')
                continue
            counts['internal'] += 1
            target = Path(unquote(parsed.path))
            target = target / 'index.html' if target.is_dir() else target
            if docs not in target.resolve().parents:
                problems[path].append(f'link leaves the site: {href}')
                continue
            if not target.is_file():
                problems[path].append(f'broken link: {href}')
                continue
            if not frag: continue
            counts['anchors'] += 1
            if target not in ids and target.suffix == '.html':
                parser = _Ids()
                parser.feed(target.read_text(encoding='utf-8', errors='replace'))
                ids[target] = parser.ids
            if unquote(frag) not in ids.get(target, set()): problems[path].append(f'broken anchor: {href}')
    return problems, counts


def page_problems(page):
    "The problems PAGE_JS found on one page, as readable lines"
    out = [f'math not rendered: {t}' for t in page['unrendered']]
    out += [f'KaTeX error: {t}' for t in page['katexErrors']]
    out += [f'raw TeX: ...{t}...' for t in page['rawTex']]
    out += [f'raw Markdown: ...{t}...' for t in page['rawMarkdown']]
    out += [f'nbdev leftover: ...{t}...' for t in page['leftovers']]
    out += [f'image did not load: {i["src"]}' for i in page['images'] if not i['ok']]
    out += [f'failed to load: {t}' for t in page['failedLoads']]
    out += [f'script error: {t}' for t in page['scriptErrors']]
    if page['textChars'] < 20: out.append(f'empty page ({page["textChars"]} characters below the title)')
    return list(dict.fromkeys(out))  # each problem once


def check_site(docs=DOCS, out='check.json', chromium=None, doc_url=None, verbose=True):
    "Check every page of `docs` in Chromium; print, write `docs`/`out` (if given) and return the report"
    t0, docs = time.perf_counter(), Path(docs).resolve()  # doc_url: the published site; None: settings.ini's
    doc_url = _doc_url() if doc_url is None else doc_url
    if not (paths := site_pages(docs)): raise FileNotFoundError(f'no pages in {docs}: build with .ci/docs')
    with Chromium(chromium) as browser:
        pages = {p: browser.inspect(p.as_uri()) for p in paths}
        version = browser.version
    links, counts = link_problems(pages, docs, doc_url)
    per_page = {}
    for p, m in pages.items():
        per_page[str(p.relative_to(docs))] = {
            'title': m['title'], 'math': m['math'], 'math_display': m['mathDisplay'],
            'images': len(m['images']), 'links': len(m['links']), 'problems': page_problems(m) + links[p]}
    totals = {k: sum(v[k] for v in per_page.values()) for k in ('math', 'math_display', 'images', 'links')}
    n_problems = sum(len(v['problems']) for v in per_page.values())
    report = {'ok': bool(pages) and n_problems == 0, 'pages': len(pages), **totals, 'links_checked': counts,
              'problems': n_problems, 'seconds': round(time.perf_counter() - t0, 1), 'browser': version,
              'per_page': per_page}
    if verbose: _print(report)
    if out: (docs / out).write_text(json.dumps(report, indent=1) + '\n')
    return report


def _print(report):
    "A line per page with its counts and problems, then the totals"
    print(f'{"page":28} {"math":>5} {"images":>6} {"links":>5}  problems')
    for name, v in report['per_page'].items():
        print(f'{name:28} {v["math"]:5} {v["images"]:6} {v["links"]:5}  {len(v["problems"])}')
        for line in v['problems']: print(f'    {line}')
    c = report['links_checked']
    print(f'{report["pages"]} pages, {report["math"]} math nodes ({report["math_display"]} display), '
          f'{report["images"]} images, {c["internal"]} internal links checked '
          f'({c["anchors"]} with an anchor), {c["external"]} external links not followed; '
          f'{report["problems"]} problems ({report["seconds"]} s, {report["browser"]})')
