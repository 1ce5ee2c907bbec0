"""The package frame: README generated from the index notebook, sidebar, pinned environment."""
import importlib.metadata as md
import importlib.machinery
import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_module():
    spec = importlib.util.spec_from_file_location('readme', ROOT / '.ci' / 'readme.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_matches_index_notebook():
    "README.md is rendered from nbs/index.ipynb; run `python .ci/readme.py` after editing the notebook"
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == _readme_module().render()


def test_readme_renderer_detects_drift(tmp_path):
    import nbformat
    nb = nbformat.read(ROOT / 'nbs' / 'index.ipynb', as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell('A new paragraph.'))
    nbformat.write(nb, tmp_path / 'index.ipynb')
    assert _readme_module().render(tmp_path / 'index.ipynb') != (ROOT / 'README.md').read_text(encoding='utf-8')


def test_readme_hides_cells_by_directive_only(tmp_path):
    "Cells hidden by `#| hide`, `#| export` or `#| echo: false` stay out of the README; the same words in code do not hide a cell"
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in ["#| hide\nsecret = 1", "#| echo: false\nquiet = 2", "#| echo: true\nshown = 3",
                                                        "text = 'echo: false'", "#|export\ndef f(): pass"]]
    nbformat.write(nb, tmp_path / 'index.ipynb')
    text = _readme_module().render(tmp_path / 'index.ipynb')
    assert 'shown = 3' in text and "text = 'echo: false'" in text
    assert 'secret' not in text and 'quiet' not in text and 'def f' not in text


def test_readme_names_the_test_command():
    "CI (.ci/run) runs the test command written in README.md"
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert '## Run the tests' in readme and '```sh\npytest\n```' in readme
    assert re.search(r'^pytest$', (ROOT / '.ci' / 'run').read_text(), re.M)


def test_sidebar_lists_every_notebook():
    "The docs sidebar (custom_sidebar = True) lists exactly the notebooks in nbs/"
    listed = re.findall(r'([\w.-]+\.ipynb)', (ROOT / 'nbs' / 'sidebar.yml').read_text())
    present = sorted(p.name for p in (ROOT / 'nbs').glob('*.ipynb'))
    assert sorted(listed) == present


def test_pinned_environment():
    "nbdev 2.4 reads settings.ini; it needs fastcore<2 and execnb<0.2 (see constraints.txt)"
    assert md.version('nbdev') == '2.4.14'
    assert int(md.version('fastcore').split('.')[0]) < 2
    major, minor = (int(x) for x in md.version('execnb').split('.')[:2])
    assert (major, minor) < (0, 2)
    cons = (ROOT / 'constraints.txt').read_text()
    for pin in ('nbdev==2.4.14', 'fastcore<2', 'execnb<0.2'): assert pin in cons


def test_nbdev_config_refresh_leaves_the_tree_clean():
    "nbdev_docs and nbdev_preview rewrite nbs/nbdev.yml from settings.ini: the tracked file must be what they write"
    from nbdev.quarto import _nbdev_yml
    from nbdev.config import get_config
    cfg = get_config(path=ROOT)
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    vals['doc_path'] = cfg.doc_path.name
    assert (ROOT / 'nbs' / 'nbdev.yml').read_text() == _nbdev_yml.format(**vals)
    assert (ROOT / 'nbs' / '_quarto.yml').is_file()  # kept as it is: refresh_quarto_yml only writes a missing one


def test_docs_processing_runs_clean_and_pages_have_no_warts(tmp_path):
    "nbdev_proc_nbs (what nbdev_docs and nbdev_preview run before Quarto) on a copy: no warnings, and API sections read cleanly"
    import shutil, subprocess, sys
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs', ignore=shutil.ignore_patterns('results', '.ipynb_checkpoints'))
    shutil.copytree(ROOT / 'nbs' / 'results', tmp_path / 'nbs' / 'results')  # chapters read their committed results
    r = subprocess.run([sys.executable, '-c', 'from nbdev.serve import proc_nbs; proc_nbs(force=True)'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Warning' not in r.stderr and 'Traceback' not in r.stderr, r.stderr[-3000:]
    pages = sorted((tmp_path / '_proc').glob('*.ipynb'))
    assert {p.name for p in pages} == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')}
    warts = {'#LNone': 'source link without a line', 'NoneType=None': 'a None default shown as a type',
             'builtin_function_or_method': 'a function default shown as a type', "<class '": 'a class default shown as its repr',
             '*args, **kwargs': 'a mixin shown with object.__init__', 'def ProxProp': 'a class shown as a function'}
    outputs = {p.name: json.dumps([c.get('outputs', []) for c in json.loads(p.read_text())['cells']]) for p in pages}
    assert sum('show_doc' in o or '```python' in o for o in outputs.values()) >= 10  # the API sections were rendered
    found = [(name, why) for name, text in outputs.items() for wart, why in warts.items() if wart in text]
    assert not found, found


def _house():
    "The .ci/house script as a module (it has no .py suffix)"
    loader = importlib.machinery.SourceFileLoader('house', str(ROOT / '.ci' / 'house'))
    spec = importlib.util.spec_from_loader('house', loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_house_has_two_rooms_no_cycles_no_undeclared_private_imports(capsys):
    "`python .ci/house --check`: the library below the lab, 0 import cycles, private names only in declared seams"
    house = _house()
    assert house.main(['--check']) == 0, capsys.readouterr().out
    modules = house.package_modules()
    assert {house.room(m) for m in modules} == {'library', 'lab'}
    assert house.room('proxprop_nb.lab.train') == 'lab' and house.room('proxprop_nb.layers') == 'library'


def test_house_finds_cycles_lazy_imports_and_private_names(tmp_path):
    "The checker itself: a lazy import that closes a cycle and an underscore name are both reported"
    house = _house()
    assert house.cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert house.cycles({'a': {'b'}, 'b': set()}) == []
    pkg = tmp_path / 'proxprop_nb'
    (pkg / 'lab').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'lab' / '__init__.py').write_text('')
    (pkg / 'solvers.py').write_text('def f():\n    from proxprop_nb.lab.train import _g\n')  # lazy, private, upward
    (pkg / 'lab' / 'train.py').write_text('from ..solvers import f\ndef _g(): pass\n')
    old = house.ROOT, house.PKG
    house.ROOT, house.PKG = tmp_path, pkg
    try:
        edges, private = house.graph(house.package_modules())
        assert house.cycles(edges) == [['proxprop_nb.lab.train', 'proxprop_nb.solvers']]
        assert private == [('proxprop_nb.solvers', 'proxprop_nb.lab.train', '_g')]
        problems = house.report(house.package_modules())
        assert any('(library) imports proxprop_nb.lab.train (lab)' in p for p in problems) and len(problems) == 3
    finally: house.ROOT, house.PKG = old
