"""pytest configuration of proxprop_nb: every notebook under `nbs/` is a test, run by nbval.

A bare `pytest` from the repository root runs `tests/` and executes each notebook cell by cell
in a fresh kernel of the current environment. This plugin adapts nbval to nbdev notebooks:

- cells marked `#| eval: false` are skipped, and so are cells carrying a flag from
  `tst_flags` in settings.ini (`#| slow`, `#| cuda`) unless asked for with
  `--nbdev-flags slow` (space or comma separated, repeatable);
- cells marked `#| cifar10` need the CIFAR-10 data: they run when a source is found or
  torchvision can download one (as the notebooks would), and are otherwise skipped with the
  reason, repeated in the summary; `--nbdev-flags cifar10` runs them regardless; `PROXPROP_DATA`
  is set to `../shared/data/cifar10-jpeg.tar.gz` when that exists and nothing else is set;
- `IN_TEST=1` is set, so `nbdev_export()` cells leave the package alone (they are skipped too);
- notebooks cleaned by `nbdev_clean` (execution counts null, outputs kept) are compared
  against their stored outputs instead of failing with "Unrun reference cell has outputs";
- stdout and results of every cell are compared with the stored ones after sanitizing
  memory addresses and timings; stderr (warnings, progress bars) is not compared, and a cell
  marked `#| nbval-ignore-output` (or nbval's own `# NBVAL_IGNORE_OUTPUT`) is only run;
- `_proc/`, `_docs/` and checkpoint folders are never collected;
- the kernels import the package of this checkout (its root is put first on `PYTHONPATH`); if another copy
  would be imported anyway, the run stops at once naming both paths.

`--nbval-lax` switches to checking only cells marked `# NBVAL_CHECK_OUTPUT`.
"""
import configparser
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest
from nbval.plugin import IPyNbCell, IPyNbFile, find_comment_markers, find_metadata_tags

_ROOT = Path(__file__).parent
_EXCLUDED_DIRS = {'_proc', '_docs', '.ipynb_checkpoints', '.quarto', '_site'}
_IGNORE_DIRECTIVE = 'nbval-ignore-output'
_DIRECTIVE_RE = re.compile(r'^\s*#\s*\|\s*(.*)$')

# (regex, replacement) applied to outputs before comparison; order matters.
SANITIZERS = [
    (r'0x[0-9a-fA-F]{6,16}', '0xADDRESS'),  # object addresses in reprs
    (r'\b\d+(\.\d+)?(e[-+]?\d+)?\s?(s|ms|us|µs|ns|sec|secs|seconds|min)\b', 'TIME'),  # durations
    (r'\b\d+(\.\d+)?\s?(it/s|s/it)\b', 'RATE'),  # progress-bar rates
    (r'\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?', 'DATETIME'),  # timestamps
    (r'(\.py)#L(\d+|None)', r'\1#LINE'),  # source links of show_doc: line numbers move with every edit above them
]


def _tst_flags():
    "Flags from `tst_flags` in settings.ini: cells carrying one are skipped unless forced"
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(_ROOT / 'settings.ini', encoding='utf-8')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())


def directives(source):
    "The nbdev directives (`#| name args`) at the top of a cell, as {name: [args]}"
    out = {}
    for line in source.splitlines():
        if not line.strip(): continue
        m = _DIRECTIVE_RE.match(line)
        if m is None: break
        text = m.group(1).strip()
        if not text: continue
        if ':' in text:  # Quarto style `key: value` (e.g. `eval: false`)
            key, _, val = text.partition(':')
            out[key.strip() + ':'] = val.split()
        else:
            key, *args = text.split()
            out[key] = args
    return out


def skip_reason(source, skip_flags, why=None):
    "Why nbdev's test runner would not execute a cell with `source`, or None; `why` explains some flags"
    if 'nbdev_export' + '(' in source: return 'nbdev_export() cell'
    d = directives(source)
    if d.get('eval:', [''])[0].lower() == 'false': return '#| eval: false'
    flags = sorted(skip_flags & d.keys())
    if not flags: return None
    notes = [why[f] for f in flags if why and f in why]
    return f"nbdev flag {', '.join(flags)} (run with --nbdev-flags {' '.join(flags)})" + ''.join(f': {n}' for n in notes)


DATA_FLAG = 'cifar10'


def cifar10_missing(where):
    "Why the notebooks in folder `where` could not get CIFAR-10 (None if they can): a local source, else a download"
    cwd = os.getcwd()
    try:
        os.chdir(where)  # the kernels run in the notebook's folder: ./data and shared/data are looked up from there
        from proxprop_nb.lab.data import find_cifar10, load_cifar10
        if find_cifar10() is None: load_cifar10()  # a torchvision download into the cache, as the notebooks would do
        return None
    except Exception as e:
        return f"no CIFAR-10 data ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); see proxprop_nb.lab.data"
    finally:
        os.chdir(cwd)


def pytest_addoption(parser):
    group = parser.getgroup('nbdev', 'nbdev notebooks as tests')
    group.addoption('--nbdev-flags', action='append', default=[],
                    help='run notebook cells carrying these tst_flags (e.g. "slow", "slow cuda")')
    group.addoption('--no-notebooks', action='store_true', help='do not collect notebooks')


SHARED_DATA = _ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'  # this project's copy of CIFAR-10, next to the repo


def _kernel_package(folder):
    "The proxprop_nb that a notebook kernel started in `folder` imports (a subprocess with this environment)"
    import subprocess, sys
    code = 'import importlib.util; print(importlib.util.find_spec("proxprop_nb").origin)'
    r = subprocess.run([sys.executable, '-c', code], cwd=folder, capture_output=True, text=True, timeout=60)
    return Path(r.stdout.strip()).resolve().parent if r.returncode == 0 and r.stdout.strip() else None


def _use_this_checkout():
    "Make notebook kernels import the package of this checkout, or stop naming both copies"
    if not (_ROOT / 'proxprop_nb').is_dir(): return  # a copy of this file outside the repository (its own tests)
    os.environ['PYTHONPATH'] = os.pathsep.join([str(_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
    got, want = _kernel_package(_ROOT / 'nbs'), (_ROOT / 'proxprop_nb').resolve()
    if got != want:
        pytest.exit(f'the notebook kernels would import proxprop_nb from {got}, not from this checkout ({want}); '
                    'install this checkout (pip install -e .) or remove the other copy', returncode=4)


def pytest_configure(config):
    os.environ['IN_TEST'] = '1'  # nbdev_export() and friends become no-ops in the kernels
    _use_this_checkout()
    # The package never searches parent folders for data; the tests name this project's copy explicitly.
    if not os.environ.get('PROXPROP_DATA') and SHARED_DATA.is_file(): os.environ['PROXPROP_DATA'] = str(SHARED_DATA)
    opt = config.option
    config._nbdev_lax = bool(getattr(opt, 'nbval_lax', False))
    # This plugin collects the notebooks; stop nbval's own collector from doing it twice.
    opt.nbval = opt.nbval_lax = False
    if not getattr(opt, 'nbval_kernel_name', None): opt.nbval_current_env = True
    forced = {f for arg in opt.nbdev_flags for f in re.split(r'[\s,]+', arg) if f}
    config._nbdev_skip_flags = _tst_flags() - forced
    config._cifar10_missing = {}  # notebook folder -> why CIFAR-10 is missing there, or None; probed once per folder


def _data_skip_flags(config, folder):
    "The flags to skip in notebooks of `folder`, and why for the data flag"
    skip = config._nbdev_skip_flags
    if DATA_FLAG not in skip: return skip, {}
    if folder not in config._cifar10_missing: config._cifar10_missing[folder] = cifar10_missing(folder)
    missing = config._cifar10_missing[folder]
    return (skip, {DATA_FLAG: missing}) if missing else (skip - {DATA_FLAG}, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for folder, why in getattr(config, '_cifar10_missing', {}).items():
        if why: terminalreporter.write_line(f'WARNING: notebook cells marked #| {DATA_FLAG} in {folder} were skipped: {why}; '
                                            f'--nbdev-flags {DATA_FLAG} runs them anyway', yellow=True, bold=True)


def pytest_collect_file(file_path, parent):
    if file_path.suffix != '.ipynb' or parent.config.option.no_notebooks: return None
    if _EXCLUDED_DIRS & set(file_path.parts): return None
    return NbdevNotebook.from_parent(parent, path=file_path)


class NbdevCell(IPyNbCell):
    "A notebook cell run by nbval; stderr is not part of the comparison"
    def compare_outputs(self, test, ref, skip_compare=None):
        keep = lambda outs: [o for o in outs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
        return super().compare_outputs(keep(test), keep(ref), skip_compare)


class NbdevNotebook(IPyNbFile):
    "An nbdev notebook collected as nbval cells, honouring nbdev directives and cleaned notebooks"
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compare_outputs = not self.config._nbdev_lax

    def setup_sanitize_files(self):
        self.sanitize_patterns.update(SANITIZERS)
        super().setup_sanitize_files()

    def collect(self):
        import nbformat
        self.nb = nbformat.read(str(self.fspath), as_version=4)
        skip_flags, why = self.config._nbdev_skip_flags, {}
        if any(DATA_FLAG in directives(c.source) for c in self.nb.cells if c.cell_type == 'code'):
            skip_flags, why = _data_skip_flags(self.config, Path(self.fspath).parent)
        cell_num = 0
        for cell in self.nb.cells:
            if cell.cell_type != 'code': continue
            options = defaultdict(bool, find_metadata_tags(cell.metadata))
            options.update(dict(find_comment_markers(cell.source)))
            if _IGNORE_DIRECTIVE in directives(cell.source): options['check'] = False
            options.setdefault('check', self.compare_outputs)
            # nbdev_clean nulls execution counts; the stored outputs are still the reference.
            if cell.get('execution_count') is None: cell['execution_count'] = cell_num + 1
            item = NbdevCell.from_parent(self, name=f'Cell {cell_num}', cell_num=cell_num, cell=cell,
                                         options=options)
            reason = skip_reason(cell.source, skip_flags, why)
            if reason: item.add_marker(pytest.mark.skip(reason=reason))
            yield item
            cell_num += 1
