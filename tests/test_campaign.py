"""The GPU campaign (proxprop_nb.lab.campaign), rehearsed on the CPU with a random stand-in for CIFAR-10."""
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import proxprop_nb
from proxprop_nb.lab import campaign as C
from proxprop_nb.lab.train import RunConfig, run_name, run_paths, read_json, source_hash

ROOT = Path(proxprop_nb.__file__).resolve().parent.parent


@pytest.fixture
def thread_pool():
    "A pool whose workers are threads of this process (schedule_runs only submits): the worker state set up here"
    C._worker_init('synthetic', 'cpu', 1, False)
    with ThreadPoolExecutor(1) as pool: yield pool
    C._WORKER.clear()


def small_plan(n):
    return [('table1', RunConfig(lr=lr, sizes=(3072, 16, 10), n_train=200, n_eval=100, epochs=2), []) for lr in (0.1, 0.05, 0.01)][:n]


def test_runs_that_cannot_finish_are_not_started(thread_pool, tmp_path):
    est = C.RunEstimator({('mlp', 'plain'): 100.0})  # 100 s per step: nothing fits in a minute
    recs = C.schedule_runs(small_plan(2), thread_pool, tmp_path, est, time.time() + 60, 1, 200, 100, log=lambda s: None)
    assert [r['outcome'] for r in recs] == ['not started: would not finish in the budget'] * 2
    assert recs[0]['predicted_s'] > 60
    assert not any(tmp_path.rglob('*.json'))


def test_deadline_stops_a_run_resumably_and_a_rerun_finishes_it(thread_pool, tmp_path, monkeypatch):
    plan = small_plan(1)
    exp, cfg, _ = plan[0]
    task = C._train_task
    monkeypatch.setattr(C, '_train_task', lambda *a: (time.sleep(0.2), task(*a))[1])  # starts after the deadline below
    est = C.RunEstimator({('mlp', 'plain'): 1e-6}, setup_s=0)  # predicts that it fits...
    recs = C.schedule_runs(plan, thread_pool, tmp_path, est, time.time() + 0.1, 1, 200, 100, log=lambda s: None)
    assert recs[0]['outcome'] == 'stopped'  # ...but the deadline stops it after its first epoch
    monkeypatch.setattr(C, '_train_task', task)
    assert run_paths(tmp_path/exp, cfg)[1].exists()  # with its checkpoint
    assert C._pending_epochs(tmp_path, exp, cfg) == 1
    recs = C.schedule_runs(plan, thread_pool, tmp_path, est, time.time() + 600, 1, 200, 100, log=lambda s: None)
    assert recs[0]['outcome'] == 'finished'
    r = read_json(run_paths(tmp_path/exp, cfg)[0])
    assert r['resumed_at_epochs'] == [1] and r['history']['epoch'] == [0, 1, 2]
    recs = C.schedule_runs(plan, thread_pool, tmp_path, est, time.time() + 600, 1, 200, 100, log=lambda s: None)
    assert recs[0]['outcome'] == 'done before'


def test_shared_run_is_copied_to_the_other_experiment(thread_pool, tmp_path):
    exp, cfg, _ = small_plan(1)[0]
    est = C.RunEstimator({('mlp', 'plain'): 1e-4})
    C.schedule_runs([('fig2', cfg, ['table1'])], thread_pool, tmp_path, est, time.time() + 600, 1, 200, 100, log=lambda s: None)
    a, b = read_json(run_paths(tmp_path/'fig2', cfg)[0]), read_json(run_paths(tmp_path/'table1', cfg)[0])
    assert a['history'] == b['history'] and b['meta']['experiment'] == 'table1' and b['meta']['shared_with'] == 'fig2'


def test_a_failing_run_is_recorded_and_the_others_go_on(thread_pool, tmp_path):
    plan = small_plan(2)
    (tmp_path/'table1').mkdir()
    bad = run_paths(tmp_path/'table1', plan[0][1])[0]
    bad.write_text(json.dumps(dict(config=plan[1][1].to_dict(), status='finished', history={})))  # another run's file, its name
    recs = C.schedule_runs(plan, thread_pool, tmp_path, C.RunEstimator({('mlp', 'plain'): 1e-4}), time.time() + 600, 1, 200, 100,
                           log=lambda s: None)
    assert recs[0]['outcome'] == 'error' and 'another configuration' in recs[0]['error']
    assert recs[1]['outcome'] == 'finished'


def test_campaign_command_rehearsal(tmp_path):
    "The command end to end on the CPU: tests (quick subset), benchmark, concurrency, runs, reports"
    out, work = tmp_path/'out', tmp_path/'work'
    env = dict(os.environ, PYTHONPATH=str(ROOT), PROXPROP_CACHE=str(tmp_path/'cache'), PROXPROP_GIT_COMMIT='0' * 40)
    p = subprocess.run([sys.executable, '-m', 'proxprop_nb.lab.campaign', '--quick', '--device', 'cpu', '--data',
                        'synthetic', '--out', str(out), '--work', str(work), '--max-runs', '3', '--max-workers', '2',
                        '--budget-minutes', '4', '--no-compare'], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    assert files == ['bench.json', 'campaign.json', 'campaign.log', 'results.tar.gz', 'summary.txt', 'tests.log']
    assert len(files) <= 8 and all((out/f).stat().st_size < 16 * 2**20 for f in files)
    rec = read_json(out/'campaign.json')
    assert rec['stages']['tests']['outcome'] == 'passed', (out/'tests.log').read_text()[-2000:]
    assert set(rec['stages']['concurrency']['speedup']) == {'1', '2'} and rec['workers'] in (1, 2)
    assert [r['outcome'] for r in rec['runs']] == ['finished'] * 3
    assert rec['environment']['source_hash'] == source_hash()
    assert (rec['environment']['commit_from'], rec['environment']['git_commit']) == ('PROXPROP_GIT_COMMIT', '0' * 40)
    with tarfile.open(out/'results.tar.gz') as t:
        names = t.getnames()
    assert len(names) == 4 and all(n.endswith('.json') for n in names)  # 3 runs, one shared by fig2 and table1
    assert 'runs (' in (out/'summary.txt').read_text()
    bench = read_json(out/'bench.json')  # BackProp with AdamW, Muon and SOAP beside the modes, at one batch size
    assert [list(r['modes'])[-3:] == ['bp_adamw', 'muon', 'soap'] for r in bench['steps']] == [True, True]


def test_campaign_spends_time_left_on_the_comparison(tmp_path):
    "After the paper's runs, the optimizer comparison's quick plan runs one at a time until the deadline, into work/compare"
    # 1.2 minutes: a comparison run is started only with estimate_s (>= 30 s) left, and on a loaded 2-core CPU the worker's
    # start and the one paper run took up to 12 s (at 0.8 minutes that left no time for any comparison run)
    rec = C.run_campaign(tmp_path/'out', budget_minutes=1.2, device='cpu', data='synthetic', quick=True, work=tmp_path/'work',
                         workers=1, max_runs=1, skip_tests=True, skip_bench=True, reserve_s=10, log=lambda s: None)
    assert [r['outcome'] for r in rec['runs']] == ['finished'] and 'error' not in rec, rec.get('traceback')
    c = rec['compare']
    assert c['setting'] == 'quick' and len(c['runs']) >= 1 and rec['stages']['compare']['runs'] == len(c['runs'])
    assert rec['elapsed_s'] < 1.2 * 60 + 5  # the comparison kept to the deadline
    with tarfile.open(tmp_path/'out'/'results.tar.gz') as t:
        names = t.getnames()
    assert sum(n.startswith('compare/') for n in names) == sum(s in ('finished', 'diverged') for _, s, _ in c['runs'])
    assert f"optimizer comparison, quick setting" in (tmp_path/'out'/'summary.txt').read_text()


def test_campaign_command_errors(tmp_path):
    with pytest.raises(SystemExit): C.main(['--out', str(tmp_path), '--budget-minutes', '0.1'])
    with pytest.raises(SystemExit): C.main(['--out', str(tmp_path), '--max-workers', '0'])
    with pytest.raises(SystemExit): C.main(['--out', str(tmp_path), '--data', str(tmp_path/'missing')])


def test_python_m_experiments_runs():
    "`python -m proxprop_nb.lab.experiments` (as torchrun starts it) runs the experiments alone: it knows no campaign"
    p = subprocess.run([sys.executable, '-m', 'proxprop_nb.lab.experiments', '--help'], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and '{fig2,table1,fig3,demo,plot}' in p.stdout and 'campaign' not in p.stdout


def test_proxprop_experiment_sends_campaign_to_the_campaign(capsys):
    "`proxprop-experiment` is `experiment_command`: the campaign among the experiments in its help, `campaign ARGS` to `main`"
    assert 'proxprop-experiment=proxprop_nb.lab.campaign:experiment_command' in (ROOT/'settings.ini').read_text()
    with pytest.raises(SystemExit) as e: C.experiment_command(['--help'])
    assert e.value.code == 0 and '{fig2,table1,fig3,demo,plot,campaign}' in capsys.readouterr().out
    with pytest.raises(SystemExit): C.experiment_command(['campaign', '--out', 'x', '--budget-minutes', '0.1'])
    assert 'proxprop-experiment campaign: error: --budget-minutes 0.1' in capsys.readouterr().err
    with pytest.raises(SystemExit): C.experiment_command(['fig4'])
    assert "invalid choice: 'fig4'" in capsys.readouterr().err


def test_batches_of_runs_are_scheduled_as_one_task_and_equal_the_runs_alone(thread_pool, tmp_path):
    plan = small_plan(3)
    est = C.RunEstimator({('mlp', 'plain'): 1e-4})
    lines = []
    recs = C.schedule_runs(plan, thread_pool, tmp_path/'b', est, time.time() + 600, 1, 200, 100, log=lines.append,
                           batch_runs=2)
    assert [(r['outcome'], r.get('batch')) for r in recs] == [('finished', 2), ('finished', 2), ('finished', None)]
    assert 'a batch of 2 runs' in lines[0]
    alone = C.schedule_runs(plan, thread_pool, tmp_path/'a', est, time.time() + 600, 1, 200, 100, log=lambda s: None)
    assert [r['outcome'] for r in alone] == ['finished'] * 3
    for _, cfg, _ in plan:
        a, b = (read_json(run_paths(tmp_path/k/'table1', cfg)[0]) for k in ('a', 'b'))
        assert b['final_train_loss'] == pytest.approx(a['final_train_loss'], rel=1e-4)
    again = C.schedule_runs(plan, thread_pool, tmp_path/'b', est, time.time() + 600, 1, 200, 100, log=lambda s: None,
                            batch_runs=2)
    assert [r['outcome'] for r in again] == ['done before'] * 3
