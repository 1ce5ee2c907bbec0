"""Faults of the command line (issue 23, items 6-8; issue 22, the first hour): `proxprop-experiment`, its `campaign`
and `plot`, and `proxprop-compare`. Each case gets a one-line message naming the argument or file and what to do, a
non-zero exit where the command did not do its job, and is refused before any training starts. The heavy work a
command would do is replaced by a stand-in that fails the test, so that a case that is not refused fails fast."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import proxprop_nb
import proxprop_nb.lab.campaign as C
import proxprop_nb.lab.compare_run as R
import proxprop_nb.lab.experiments as E
from proxprop_nb.lab.data import find_cifar10
from proxprop_nb.lab.train import run_name, synthetic_cifar10

ROOT = Path(proxprop_nb.__file__).resolve().parent.parent
RESULTS = ROOT/'nbs'/'results'
INTERRUPTED = 'interrupted; rerun the same command to resume'


def _must_not_run(*args, **kw):
    raise AssertionError('the command went on to train instead of refusing the arguments')


@pytest.fixture
def no_training(monkeypatch):
    "Training stand-ins that fail the test: a case must be refused before any of them is called"
    for module, name in ((E, 'run_experiment'), (E, 'load_cifar10'), (C, 'run_campaign'), (R, 'run_setting')):
        monkeypatch.setattr(module, name, _must_not_run)


def _exit(capsys, command, argv) -> tuple:
    "(exit status, stderr) of `command(argv)`, whether it returns or exits"
    try: code = command(argv)
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err


# --- item 6: validate before training --------------------------------------------------------------------------------

@pytest.mark.parametrize('tau,why', [('1e300', 'not finite in float32'), ('1e-50', 'is 0 in float32')])
def test_step_size_outside_float32_is_refused(capsys, no_training, tmp_path, tau, why):
    "table1 --taus 1e300 aborted the whole sweep at its first run (a RuntimeError in the optimizer)"
    code, err = _exit(capsys, E.main, ['table1', '--quick', '--taus', '1', tau, '--out', str(tmp_path/'t1')])
    assert code == 2 and why in err and repr(float(tau)) in err and err.startswith('usage: proxprop-experiment')
    with pytest.raises(ValueError, match='float32'): E.experiment_configs('table1', taus=[float(tau)])


def test_campaign_budget_must_be_finite(capsys, no_training, tmp_path):
    "campaign --budget-minutes inf was accepted"
    code, err = _exit(capsys, C.experiment_command, ['campaign', '--out', str(tmp_path/'c'), '--data', 'synthetic',
                                                     '--budget-minutes', 'inf'])
    assert code == 2 and '--budget-minutes inf: use a finite number of minutes' in err
    assert not (tmp_path/'c').exists()


@pytest.mark.parametrize('device', ['mps', 'meta'])
def test_campaign_unsupported_device_is_refused(capsys, no_training, tmp_path, device):
    "campaign --device mps: every run failed, exit 0"
    code, err = _exit(capsys, C.experiment_command, ['campaign', '--out', str(tmp_path/'c'), '--data', 'synthetic',
                                                     '--device', device])
    assert code == 2 and f"--device {device}: '{device}' is not supported: use 'cpu' or 'cuda'" in err


def test_campaign_whose_runs_fail_exits_non_zero(capsys, monkeypatch, tmp_path):
    "A campaign whose every run ended in an error said so only in its summary, and exited 0"
    def failing(out, *a, **kw):
        Path(out).mkdir(parents=True, exist_ok=True); (Path(out)/'summary.txt').write_text('runs: error 1\n')
        return dict(runs=[dict(outcome='error', name='x', error='RuntimeError: no')])
    monkeypatch.setattr(C, 'run_campaign', failing)
    code, err = _exit(capsys, C.main, ['--out', str(tmp_path/'c'), '--data', 'synthetic', '--device', 'cpu'])
    assert code == 1 and '1 of 1 runs ended in an error' in err


def test_compare_unsupported_device_is_refused(capsys, no_training, tmp_path):
    "proxprop-compare --device mps: a traceback after the first run started"
    code, err = _exit(capsys, R.main, ['--setting', 'quick', '--device', 'mps', '--out', str(tmp_path/'c')])
    assert code == 2 and "--device mps: 'mps' is not supported" in err and err.startswith('usage: proxprop-compare')


@pytest.mark.parametrize('minutes', ['inf', 'nan', '0', '-1'])
def test_compare_budget_must_be_finite_and_positive(capsys, no_training, tmp_path, minutes):
    code, err = _exit(capsys, R.main, ['--setting', 'quick', '--budget-minutes', minutes, '--out', str(tmp_path)])
    assert code == 2 and f'--budget-minutes {float(minutes)}: use a finite number of minutes > 0' in err


def test_compare_unwritable_out_is_refused_before_training(capsys, no_training, tmp_path):
    "proxprop-compare with an --out it cannot write: a traceback after training"
    (tmp_path/'a-file').write_text('x')
    code, err = _exit(capsys, R.main, ['--setting', 'quick', '--out', str(tmp_path/'a-file'/'compare')])
    assert code == 1 and err.startswith('proxprop-compare: error: cannot write') and 'a-file' in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('command,argv,target', [
    (E.main, ['demo', '--data', 'synthetic-nowhere'], (E, 'run_experiment')),
    (C.experiment_command, ['campaign', '--data', 'synthetic', '--device', 'cpu'], (C, 'run_campaign')),
    (R.main, ['--setting', 'quick'], (R, 'run_setting'))])
def test_ctrl_c_ends_in_one_line_and_exit_130(capsys, monkeypatch, tmp_path, command, argv, target):
    "Ctrl-C ended in a KeyboardInterrupt traceback"
    def interrupted(*a, **kw): raise KeyboardInterrupt
    monkeypatch.setattr(*target, interrupted)
    monkeypatch.setattr(E, 'load_cifar10', lambda data: synthetic_cifar10(64, 32, 32))
    code, err = _exit(capsys, command, argv + ['--out', str(tmp_path/'out')])
    assert code == 130 and err.strip().endswith(INTERRUPTED) and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(find_cifar10() is None, reason='no local CIFAR-10')
def test_ctrl_c_in_a_real_run(tmp_path):
    "SIGINT to the installed command while it trains: one line and exit 130, no traceback"
    argv = [sys.executable, '-c', 'import sys; from proxprop_nb.lab.campaign import experiment_command as c; '
            'sys.exit(c())', 'demo', '--threads', '1', '--no-progress', '--out', str(tmp_path/'demo')]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.startswith('[1/3]'): break
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == f'proxprop-experiment: {INTERRUPTED}', err[-2000:]
    assert 'Traceback' not in err


# --- item 7: campaign workers ----------------------------------------------------------------------------------------

def test_campaign_workers_capped_at_runs_to_do_and_cores(monkeypatch, tmp_path):
    "campaign --workers 10 for one run started 10 workers (5.9 GB)"
    started, said = [], []
    def start_workers(n, *a):
        started.append(n); raise KeyboardInterrupt  # stop here: the pool's size is what is checked
    monkeypatch.setattr(C, '_start_workers', start_workers)
    with pytest.raises(KeyboardInterrupt):
        C.run_campaign(tmp_path/'out', 1, 'cpu', 'synthetic', quick=True, work=tmp_path/'work', workers=10, max_runs=1,
                       skip_tests=True, log=said.append)
    assert started == [1] and any('--workers 10: capped at 1 (1 run to do' in s for s in said)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    with pytest.raises(KeyboardInterrupt):
        C.run_campaign(tmp_path/'out', 1, 'cpu', 'synthetic', quick=True, work=tmp_path/'work', workers=None,
                       max_workers=64, max_runs=100, skip_tests=True, log=said.append)
    assert started[1] == max(C._levels(min(cores, 64)))  # the most runs at once tried, at most the cores


# --- item 8: unclear ones --------------------------------------------------------------------------------------------

def test_dangling_out_link_is_named(capsys, no_training, tmp_path):
    "A dangling --out link was reported as 'a part of the path is a file'"
    (tmp_path/'out').symlink_to(tmp_path/'gone')
    code, err = _exit(capsys, E.main, ['fig2', '--quick', '--out', str(tmp_path/'out')])
    assert code == 1 and f"{tmp_path/'out'} is a symbolic link to {tmp_path/'gone'}, which does not exist" in err
    code, err = _exit(capsys, R.main, ['--setting', 'quick', '--out', str(tmp_path/'out'/'sub')])
    assert code == 1 and 'which does not exist' in err
    code, err = _exit(capsys, C.main, ['--out', str(tmp_path/'out'), '--data', 'synthetic'])
    assert code == 1 and 'which does not exist' in err


def test_step_sizes_with_one_run_name_are_refused(capsys, no_training, tmp_path):
    "--taus 0.3 0.30000000000000004: both named lr0.3, so the second run failed"
    code, err = _exit(capsys, E.main, ['table1', '--taus', '0.3', '0.30000000000000004', '--out', str(tmp_path)])
    assert code == 2 and '0.3 and 0.30000000000000004' in err and "'lr0.3'" in err
    assert len(E.experiment_configs('table1', taus=[1, 1.0], methods=['backprop'])) == 1  # the same float: one run
    names = [run_name(c) for c in E.experiment_configs('table1')]  # names of committed results stay as they are
    assert 'mlp-sgd-lr0.0005-backprop-ep50-seed0' in names and 'mlp-sgd-lr50-cg3-official-tauprox1-ep50-seed0' in names


# --- issue 22: the first hour ----------------------------------------------------------------------------------------

def test_failed_start_leaves_no_empty_folder(capsys, monkeypatch, tmp_path):
    "A demo without data left an empty ./proxprop-results/demo/"
    monkeypatch.chdir(tmp_path)
    code, err = _exit(capsys, E.main, ['demo', '--data', str(tmp_path/'nowhere'), '--no-progress'])
    assert code == 1 and 'nowhere' in err and list(tmp_path.iterdir()) == []
    (tmp_path/'kept').mkdir()  # a folder that was there before is left alone
    code, err = _exit(capsys, E.main, ['demo', '--data', str(tmp_path/'nowhere'), '--out', str(tmp_path/'kept')])
    assert code == 1 and (tmp_path/'kept').is_dir()


def test_compare_writes_next_to_the_experiments_by_default(monkeypatch, tmp_path, capsys):
    "proxprop-compare wrote to results/compare-SETTING, the experiments to proxprop-results/EXPERIMENT"
    folders = []
    monkeypatch.setattr(R, 'run_setting', lambda setting, out, *a, **k: folders.append(out) or {})
    monkeypatch.chdir(tmp_path)
    assert R.main(['--setting', 'quick', '--networks', 'lm']) == 0
    assert folders == [Path('proxprop-results')/'compare-quick']
    assert R.main(['--setting', 'quick', '--out', 'results/compare-quick']) == 0  # an old folder, given with --out
    assert folders[-1] == Path('results')/'compare-quick'


@pytest.mark.parametrize('name,lists', [
    ('fig2', ['8 runs', 'ProxProp (cg10, official CG)', 'tau 0.05', 'tau_theta 0.05', '50 epochs']),
    ('table1', ['63 runs', 'tau 50, 10, 5, 1, 0.5, 0.1, 0.05, 0.005, 0.0005', 'tau_theta 1']),
    ('fig3', ['5 runs', 'ConvNet', 'Adam', 'tau 0.001']),
    ('demo', ['3 runs', 'tau 1, 0.1', '2,500 of 45,000 training images', '4 of 50 epochs',
              'nbs/results/demo_sweep'])])
def test_per_experiment_help(capsys, name, lists):
    "proxprop-experiment fig2 --help printed the generic help"
    with pytest.raises(SystemExit) as e: C.experiment_command([name, '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert e.value.code == 0 and out.startswith(f'usage: proxprop-experiment {name}')
    assert all(s in out for s in lists), [s for s in lists if s not in out]
    assert "'tauprox' in run names" in out  # one name, tau_theta, and its spelling in run names


def test_generic_and_campaign_help(capsys):
    with pytest.raises(SystemExit): C.experiment_command(['--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert '{fig2,table1,fig3,demo,plot,campaign}' in out and 'demo: 4' in out
    with pytest.raises(SystemExit): C.experiment_command(['campaign', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert out.startswith('usage: proxprop-experiment campaign') and 'runs in priority order' in out
    assert f'{len(C.campaign_plan())} runs' in out


def test_demo_baseline_is_its_protocols_best_step_size():
    "The demo compared with BackProp at tau=0.05, Table 1's best, which at the demo's protocol ends near chance"
    demo = E.experiment_configs('demo')
    assert [(c.method, c.lr) for c in demo] == [('backprop', 1.0), ('backprop', 0.1), ('cg3', 1.0)]
    rows = E.load_results(RESULTS/'demo_sweep')
    finished = {r['lr'] for r in rows if r['method'] == 'backprop'} - {
        r['lr'] for r in rows if r['method'] == 'backprop' and r['status'] != 'finished'}
    mean = {t: sum(r['final_train_loss'] for r in rows if r['lr'] == t) / 3 for t in finished}
    assert min(mean, key=mean.get) == 0.1
    assert 'tau = 0.1 (a 3-seed sweep: nbs/results/demo_sweep)' in E.EXPERIMENTS['demo'].title


def test_demo_summary_rows_are_labelled_with_their_tau():
    "The demo's summary had two rows both labelled 'BackProp'"
    rows = [r for r in E.load_results(RESULTS/'demo_sweep') if r['seed'] == 0 and r['lr'] in (1.0, 0.1)]
    text = E.format_runs(rows)
    assert 'BackProp, tau=1 ' in text and 'BackProp, tau=0.1 ' in text and 'ProxProp (cg3) ' in text
    summary = E.demo_summary(rows)
    assert 'BackProp at its best step size for this protocol, tau = 0.1 (a 3-seed sweep: nbs/results/demo_sweep)' in summary


def test_plot_command_writes_pngs(capsys, tmp_path):
    "The command line wrote no figures: `proxprop-experiment plot --out DIR`"
    copies = dict(demo=('demo_sweep', ['*-seed0.json']), table1=('table1', ['*-backprop-*', '*-cg3-official-*']))
    for exp, (folder, patterns) in copies.items():
        (tmp_path/exp).mkdir()
        for f in [f for p in patterns for f in (RESULTS/folder).glob(p)]: shutil.copy(f, tmp_path/exp)
    assert C.experiment_command(['plot', '--out', str(tmp_path/'table1')]) == 0
    assert sorted(p.name for p in (tmp_path/'table1').glob('*.png')) == ['curves.png', 'table1.png']
    assert C.experiment_command(['plot', '--out', str(tmp_path)]) == 0  # a folder of experiments' folders
    assert (tmp_path/'demo'/'curves.png').exists()
    for png in tmp_path.rglob('*.png'):
        with Image.open(png) as im: im.verify()
        with Image.open(png) as im: assert im.format == 'PNG' and min(im.size) > 200
    code, err = _exit(capsys, C.experiment_command, ['plot', '--out', str(tmp_path/'none')])
    assert code == 1 and 'no results files' in err
