#!/usr/bin/env python
"""Render README.md from nbs/index.ipynb without Quarto (which `nbdev_readme` needs).

    python .ci/readme.py           # rewrite README.md
    python .ci/readme.py --check   # exit 1 if README.md and the notebook have drifted apart

Markdown cells are copied; code cells become ```python blocks followed by their stored text
outputs; cells marked `#| hide` (or any nbdev hiding directive) are left out, and nbdev
directive lines are removed; links to notebooks (`](01_solvers.ipynb)`) point into nbs/. tests/test_frame.py runs
the check.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NB, README = ROOT / 'nbs' / 'index.ipynb', ROOT / 'README.md'
HIDE = {'hide', 'exporti', 'export', 'exports', 'default_exp'}
HEADER = '<!-- Generated from nbs/index.ipynb by `python .ci/readme.py`: edit the notebook, not this file. -->\n\n'
_dir = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')


def _src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def _split_directives(src):
    lines = src.splitlines()
    names, i = {}, 0
    while i < len(lines) and (not lines[i].strip() or _dir.match(lines[i])):
        m = _dir.match(lines[i])
        if m: names[m.group(1)] = m.group(2)
        i += 1
    return names, '\n'.join(lines[i:]).strip('\n')


def _outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream' and o.get('name') == 'stdout': text = o['text']
        elif o['output_type'] in ('execute_result', 'display_data') and 'text/markdown' in o['data']:
            out.append(''.join(o['data']['text/markdown']).strip() + '\n'); continue
        elif o['output_type'] in ('execute_result', 'display_data') and 'image/png' not in o['data']:
            text = o['data'].get('text/plain', '')
        else: continue
        text = ''.join(text) if isinstance(text, list) else text
        if text.strip(): out.append('```\n' + text.rstrip('\n') + '\n```\n')
    return out


def render(nb_path=NB):
    "The README text for the notebook at `nb_path`"
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        src = _src(cell)
        if cell['cell_type'] == 'markdown':
            src = re.sub(r'\]\((\w+\.ipynb)\)', r'](nbs/\1)', src)  # the README sits one folder up
            if src.strip(): parts.append(src.strip('\n') + '\n')
        elif cell['cell_type'] == 'code':
            names, code = _split_directives(src)
            if names.keys() & HIDE or names.get('echo', '').lower() == 'false' or not code.strip(): continue
            parts.append('```python\n' + code + '\n```\n')
            parts.extend(_outputs(cell))
    return HEADER + '\n'.join(parts)


if __name__ == '__main__':
    text = render()
    if '--check' in sys.argv:
        if not README.exists() or README.read_text(encoding='utf-8') != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`')
        print('README.md matches nbs/index.ipynb')
    else:
        README.write_text(text, encoding='utf-8')
        print(f'wrote {README}')
