"""The experiments and the `proxprop-experiment` command (proxprop_nb.lab.experiments)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import proxprop_nb.lab.train as T
from proxprop_nb.lab.data import find_cifar10
from proxprop_nb.lab.experiments import (EXPERIMENTS, PAPER_TABLE1, TABLE1_TAUS, experiment_configs, format_table1, load_results,
                                     describe_runs, main, protocol, run_experiment, table1_grid)
from proxprop_nb.lab.train import run_name, synthetic_cifar10

DEEP = (192, 256, 256, 256, 10)




def test_experiment_definitions():
    fig2 = experiment_configs('fig2')
    assert [(c.method, c.lr, c.optimizer, c.momentum) for c in fig2[:2]] == [('backprop', 0.05, 'sgd', 0.95), ('exact', 1.0, 'sgd', 0.95)]
    assert sorted((c.method, c.cg_variant, c.lr) for c in fig2[2:]) == [(m, v, 1.0) for m in ('cg10', 'cg3', 'cg5') for v in ('official', 'textbook')]
    assert {c.tau_prox for c in fig2[1:]} == {0.05}
    t1 = experiment_configs('table1')
    assert len(t1) == 63 and len({run_name(c) for c in t1}) == 63
    assert {(c.method, c.cg_variant) for c in t1} == {('backprop', 'textbook')} | {(m, v) for m in ('cg1', 'cg3', 'cg5') for v in ('textbook', 'official')}
    assert {c.lr for c in t1} == set(TABLE1_TAUS) and {c.tau_prox for c in t1 if c.method != 'backprop'} == {1.0}
    fig3 = experiment_configs('fig3')
    assert sorted((c.model, c.optimizer, c.lr, c.method, c.cg_variant, c.arch) for c in fig3) == sorted(
        [('convnet', 'adam', 1e-3, 'backprop', 'textbook', 'official')] + [('convnet', 'adam', 1e-3, m, v, 'official') for m in ('cg3', 'cg10') for v in ('textbook', 'official')])
    assert all((c.epochs, c.batch_size, c.n_train, c.seed) == (50, 500, None, 0) for c in fig2 + t1 + fig3)
    assert {protocol(c) for c in fig2 + t1 + fig3} == {'full protocol'}
    assert set(PAPER_TABLE1) == {'backprop', 'cg1', 'cg3', 'cg5'} and all(len(v) == 9 for v in PAPER_TABLE1.values())


def test_reduced_and_quick_protocols_are_labelled():
    q = experiment_configs('table1', quick=True, taus=[1], methods=['cg3'], cg_variant='official')
    assert [(c.n_train, c.n_eval, c.epochs, c.cg_variant) for c in q] == [(300, 500, 2, 'official')]
    assert protocol(q[0]).startswith('reduced: 300 of 45,000 training images')
    r = experiment_configs('fig2', n_train=10000, epochs=20)
    assert {protocol(c) for c in r} == {'reduced: 10,000 of 45,000 training images, 20 of 50 epochs'}


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize('argv,msg', [
    (['fig4'], "invalid choice: 'fig4'"),
    ([], 'the following arguments are required'),
    (['table1', '--taus', '1', '-0.5'], "invalid step size tau '-0.5'"),
    (['table1', '--taus', 'nan'], "invalid step size tau 'nan'"),
    (['table1', '--taus', 'big'], "invalid step size tau 'big'"),
    (['fig2', '--taus', '1'], 'taus apply to table1 only'),
    (['fig3', '--methods', 'cg5'], "methods ['cg5'] not valid for fig3"),
    (['table1', '--cg-variant', 'fast'], "invalid choice: 'fast'"),
    (['fig2', '--arch', 'paper'], 'arch applies to the ConvNet'),
    (['fig2', '--epochs', '0'], "invalid value '0'"),
    (['fig2', '--n-train', '-5'], "invalid value '-5'"),
    (['fig2', '--device', 'gpu0'], '--device gpu0: not a torch device'),
])
def test_cli_usage_errors(capsys, argv, msg):
    err = _usage_error(capsys, argv)
    assert msg in err and err.startswith('usage: proxprop-experiment')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without a GPU')
def test_cli_cuda_without_gpu(capsys):
    assert '--device cuda: no GPU is available' in _usage_error(capsys, ['fig2', '--quick', '--device', 'cuda'])


@pytest.mark.parametrize('where', ['nowhere', 'empty'])
def test_cli_missing_data(capsys, tmp_path, where):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit) as e: main(['fig2', '--quick', '--data', str(tmp_path / where), '--out', str(tmp_path / 'out'), '--no-progress'])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith('proxprop-experiment: error:') and where in err and 'cifar-10-batches-py' in err


def test_console_script_help():
    exe = Path(sys.executable).parent / 'proxprop-experiment'
    if not exe.exists(): pytest.skip('the console script is not installed in this environment')
    r = subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith('usage: proxprop-experiment') and 'table1' in r.stdout


def test_sweep_skips_finished_and_resumes_interrupted(toy, tmp_path, monkeypatch):
    sweep = dict(taus=[1, 1e4], methods=['backprop', 'cg3'], cg_variant='official', epochs=2, sizes=DEEP)
    calls, real = [], T.train_epoch
    def interrupted(*a, **k):  # Ctrl-C in the second epoch of the third run
        calls.append(1)
        if len(calls) == 6: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, 'train_epoch', interrupted)
    with pytest.raises(KeyboardInterrupt): run_experiment('table1', tmp_path, toy, 'cpu', progress=False, log=None, **sweep)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == ['.ckpt', '.json', '.json']  # two done (one diverged early), one interrupted
    monkeypatch.setattr(T, 'train_epoch', real)
    lines = []
    rows = run_experiment('table1', tmp_path, toy, 'cpu', progress=False, log=lines.append, **sweep)
    assert lines[0].startswith('table1: 4 runs (2 done already)')
    assert not any('skipped' in l for l in lines) and sum(l.startswith('[') for l in lines) == 2  # only the runs to do are listed
    assert [r['status'] for r in rows] == ['finished', 'diverged', 'finished', 'finished'] and rows[2]['resumed_at_epochs'] == [1]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == ['.json'] * 4
    grid = table1_grid(load_results(tmp_path), 'official')
    assert grid['backprop'][1e4] == '–' and isinstance(grid['cg3'][1.0], float)
    table = format_table1(load_results(tmp_path), 'official').splitlines()
    assert table[1].split()[:2] == ['BackProp', '–'] and table[2].split()[-4:] == ['0.524', '0.091', '0.637', '1.531']


def test_load_results_ignores_other_files(toy, tmp_path):
    run_experiment('table1', tmp_path, toy, 'cpu', progress=False, log=None, taus=[1], methods=['backprop'], epochs=1, sizes=(192, 8, 10))
    (tmp_path / 'notes.json').write_text(json.dumps({'hello': 1}))
    (tmp_path / 'README.md').write_text('x')
    rows = load_results(tmp_path)
    assert len(rows) == 1 and rows[0]['status'] == 'finished' and rows[0]['experiment'] == 'table1'
    assert rows[0]['history']['epoch'] == [0, 1] and rows[0]['n_train'] == 64
    text = describe_runs(rows)
    assert 'protocol: reduced: 1 of 50 epochs' in text and 'synthetic' in text and 'machine: CPU' in text
    assert load_results(tmp_path / 'missing') == []


@pytest.mark.skipif(find_cifar10() is None, reason='no local CIFAR-10')
def test_quick_end_to_end(tmp_path, capsys):
    argv = ['table1', '--quick', '--epochs', '1', '--taus', '1', '--methods', 'backprop', 'cg1', '--cg-variant', 'official',
            '--threads', '1', '--no-progress', '--out', str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'Table 1, official CG:' in out and 'reduced: 300 of 45,000 training images' in out and 'JPEG' in out
    rows = load_results(tmp_path)
    assert sorted((r['method'], r['status'], r['epochs_done'], r['n_train']) for r in rows) == [('backprop', 'finished', 1, 300), ('cg1', 'finished', 1, 300)]
    assert all(r['history']['epoch'] == [0, 1] for r in rows)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 'table1: 2 runs (2 done already)' in out and 'skipped' not in out and 'Table 1, official CG:' in out
