"""The test command's notebook runner (conftest.py): nbdev directives, cleaned notebooks, output comparison."""
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _nb(cells):
    "A cleaned notebook (execution counts null, outputs kept) from (source, stdout-or-None) pairs"
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}}
    for i, (src, out) in enumerate(cells):
        c = nbformat.v4.new_code_cell(src)
        c.id = f'cell{i}'
        c.execution_count = None
        if out is not None: c.outputs = [nbformat.v4.new_output('stream', name='stdout', text=out)]
        nb.cells.append(c)
    return nb


def _run(tmp_path, cells, *args):
    "Run pytest with the project's conftest.py on a notebook made of `cells`; outcome per cell and exit code"
    shutil.copy(ROOT / 'conftest.py', tmp_path / 'conftest.py')
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    (tmp_path / 'pytest.ini').write_text('[pytest]\n')
    nbformat.write(_nb(cells), tmp_path / 'nb.ipynb')
    xml = tmp_path / 'report.xml'
    r = subprocess.run([sys.executable, '-m', 'pytest', 'nb.ipynb', '-p', 'no:cacheprovider', f'--junitxml={xml}', *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    outcome = {}
    for case in ET.parse(xml).iter('testcase'):
        kind = next((c.tag for c in case if c.tag in ('failure', 'error', 'skipped')), 'passed')
        outcome[int(case.get('name').split()[-1])] = kind
    return outcome, r.returncode, r.stdout + r.stderr


CELLS = [
    ('print(1 + 1)', '2\n'),                                                    # 0 compared, matches
    ('#| eval: false\nraise RuntimeError("never run")', None),                  # 1 skipped
    ('#| slow\nraise RuntimeError("slow cell ran")', None),                     # 2 skipped unless forced
    ('import os\nprint(os.environ.get("IN_TEST"))', '1\n'),                     # 3 IN_TEST set in the kernel
    ('print(object())', '<object object at 0x7f3a2b1c9d80>\n'),                 # 4 address sanitized
    ('print("epoch took", 12.5, "s")', 'epoch took 3.1 s\n'),                   # 5 timing sanitized
    ('#| nbval-ignore-output\nimport random\nprint(random.random())', '0.5\n'),  # 6 run, not compared
    ('import sys\nprint("warning", file=sys.stderr)', None),                    # 7 stderr not compared
    ('from nbdev import nbdev_export\nnbdev_export()', None),                   # 8 skipped
    ('print("[source](https://x/blob/main/pkg/mod.py#L81)")', '[source](https://x/blob/main/pkg/mod.py#L90)\n'),  # 9 show_doc line sanitized
]


def test_directives_and_cleaned_notebooks(tmp_path):
    outcome, code, log = _run(tmp_path, CELLS)
    assert code == 0, log
    assert outcome == {0: 'passed', 1: 'skipped', 2: 'skipped', 3: 'passed', 4: 'passed', 5: 'passed',
                       6: 'passed', 7: 'passed', 8: 'skipped', 9: 'passed'}, log


def test_forced_flag_runs_slow_cells(tmp_path):
    outcome, code, log = _run(tmp_path, CELLS, '--nbdev-flags', 'slow')
    assert code != 0
    assert outcome[2] == 'failure' and 'slow cell ran' in log
    assert outcome[1] == 'skipped'


def test_raising_cell_fails(tmp_path):
    outcome, code, log = _run(tmp_path, [('x = 1', None), ('raise ValueError("boom")', None)])
    assert code != 0 and outcome[1] == 'failure' and 'boom' in log


def test_changed_number_fails(tmp_path):
    outcome, code, log = _run(tmp_path, [('print(0.123456)', '0.123457\n')])
    assert code != 0 and outcome[0] == 'failure', log
    assert 'Cell outputs differ' in log


def test_missing_output_fails(tmp_path):
    "A cell whose stored output was lost (or which starts printing) no longer matches"
    outcome, code, log = _run(tmp_path, [('print(3)', None)])
    assert code != 0 and outcome[0] == 'failure', log


@pytest.mark.parametrize('src, expect', [
    ('#| eval: false\nx', '#| eval: false'),
    ('#| slow\nx', 'nbdev flag slow'),
    ('#|export\n#| cuda\nx', 'nbdev flag cuda'),
    ('x = 1\n#| slow', None),  # directives only count at the top of a cell
    ('#| eval:false\nx', '#| eval: false'),
])
def test_skip_reason(src, expect):
    import importlib.util
    spec = importlib.util.spec_from_file_location('root_conftest', ROOT / 'conftest.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    reason = mod.skip_reason(src, {'slow', 'cuda'})
    assert (reason is None) if expect is None else reason.startswith(expect)


DATA_CELLS = [('print(1)', '1\n'), ('#| cifar10\nraise RuntimeError("data cell ran")', None)]


def test_data_cells_skipped_with_the_reason_when_cifar10_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv('PROXPROP_DATA', str(tmp_path / 'nowhere'))  # an explicit source that does not exist
    outcome, code, log = _run(tmp_path, DATA_CELLS, '-rs')
    assert code == 0 and outcome == {0: 'passed', 1: 'skipped'}, log
    assert 'no CIFAR-10 data (Cifar10NotFoundError' in log and 'nowhere' in log, log
    assert 'WARNING: notebook cells marked #| cifar10' in log, log


def test_data_cells_forced_run_and_fail_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv('PROXPROP_DATA', str(tmp_path / 'nowhere'))
    outcome, code, log = _run(tmp_path, DATA_CELLS, '--nbdev-flags', 'cifar10')
    assert code != 0 and outcome[1] == 'failure' and 'data cell ran' in log, log


def test_data_cells_run_when_a_source_is_found(tmp_path, monkeypatch):
    src = tmp_path / 'fake-cifar'
    for part in ('train', 'test'): (src / part / 'airplane').mkdir(parents=True)  # the ImageFolder layout is what the lookup checks
    monkeypatch.setenv('PROXPROP_DATA', str(src))
    outcome, code, log = _run(tmp_path, DATA_CELLS)
    assert code != 0 and outcome[1] == 'failure' and 'data cell ran' in log, log


def test_kernels_must_import_this_checkout(monkeypatch):
    "If a notebook kernel would import another copy of the package, the run stops at once naming both"
    import importlib.util
    spec = importlib.util.spec_from_file_location('root_conftest', ROOT / 'conftest.py')
    conf = importlib.util.module_from_spec(spec); spec.loader.exec_module(conf)
    assert conf._kernel_package(ROOT / 'nbs') == (ROOT / 'proxprop_nb').resolve()  # as the test run set it up
    monkeypatch.setattr(conf, '_kernel_package', lambda folder: Path('/elsewhere/proxprop_nb'))
    with pytest.raises(BaseException) as e: conf._use_this_checkout()
    assert '/elsewhere/proxprop_nb' in str(e.value) and str(ROOT / 'proxprop_nb') in str(e.value)
