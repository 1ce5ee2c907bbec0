"""Fault injection: damaged, foreign or planted files, full disks, bad settings and concurrent runs, each ending in a clear
message naming the file or setting, or in a correct result, with nothing lost (the hardening issue's cases, on toy data)."""
import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import proxprop_nb.lab.train as T
import proxprop_nb.lab.runfiles as RF
from proxprop_nb import ProxPropConv2d
from proxprop_nb.lab.experiments import load_results, main as experiment_main, run_experiment
from proxprop_nb.solvers import check_prox_args, parse_mode
from proxprop_nb.lab.train import RunConfig, RunFileError, run_name, run_paths, train, read_json, write_json, save_checkpoint

SMALL = dict(sizes=(192, 16, 10), batch_size=16, epochs=2)


def cfg(**kw): return RunConfig(**{**SMALL, **kw})


def dead_pid() -> int:
    "The pid of a process that has ended"
    p = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    return int(p.stdout)


# ---- 2. damaged checkpoints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('damage', ['truncated', 'random', 'empty'])
def test_damaged_checkpoint_is_moved_aside_and_the_run_restarts(toy, tmp_path, damage):
    c = cfg(epochs=3)
    full = train(c, toy, None, 'cpu', progress=False)
    train(c, toy, tmp_path, 'cpu', progress=False, stop_after=1)
    ckpt = run_paths(tmp_path, c)[1]
    b = ckpt.read_bytes()
    ckpt.write_bytes({'truncated': b[:len(b) // 2], 'random': os.urandom(4096), 'empty': b''}[damage])
    with pytest.warns(RuntimeWarning, match=rf'{ckpt.name} is damaged.*moved to {ckpt.name}\.damaged-'):
        r = train(c, toy, tmp_path, 'cpu', progress=False)
    assert r['status'] == 'finished' and r['resumed_at_epochs'] == []  # started again
    assert r['history']['train_loss'] == full['history']['train_loss']
    kept = list(tmp_path.glob(f'{ckpt.name}.damaged-*'))
    assert len(kept) == 1 and kept[0].read_bytes()[:16] == ({'truncated': b[:16], 'random': kept[0].read_bytes()[:16], 'empty': b''}[damage])


def test_load_checkpoint_names_the_file_and_never_suggests_unsafe_loading(tmp_path):
    f = tmp_path / 'x.ckpt'
    f.write_bytes(os.urandom(1000))
    with pytest.raises(RunFileError) as e: RF.load_checkpoint(f)
    assert str(f) in str(e.value) and 'weights_only=False' not in str(e.value)


def test_checkpoints_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(fd), real(fd)))
    save_checkpoint(tmp_path / 'c.ckpt', dict(a=torch.ones(3)))
    assert synced and torch.load(tmp_path / 'c.ckpt', weights_only=True)['a'].sum() == 3


# ---- 3. damaged results files ----------------------------------------------------------------------------------------

BAD_JSON = {'truncated': '{"format": 1, "config": {', 'random': os.urandom(200), 'empty': b'', 'list': '[]',
            'no config': '{"format": 1, "status": "finished", "history": {}}',
            'no history': None}


@pytest.mark.parametrize('damage', list(BAD_JSON))
def test_damaged_results_file_is_moved_aside_and_the_sweep_goes_on(toy, tmp_path, damage):
    out = tmp_path / 'out'
    rows = run_experiment('table1', out, toy, 'cpu', progress=False, log=None, methods=['backprop'], taus=[0.1, 0.05],
                          sizes=(192, 16, 16, 16, 10), epochs=1)
    assert [r['status'] for r in rows] == ['finished', 'finished']
    victim = out / f"{rows[0]['name']}.json"
    if damage == 'no history':
        r = read_json(victim); del r['history']; victim.write_text(json.dumps(r))
    else:
        content = BAD_JSON[damage]
        victim.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(RuntimeWarning, match=rf'{victim.name}'):
        rows = load_results(out)  # the tables skip it, with a warning naming it
    assert len(rows) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        again = run_experiment('table1', out, toy, 'cpu', progress=False, log=None, methods=['backprop'], taus=[0.1, 0.05],
                               sizes=(192, 16, 16, 16, 10), epochs=1)
    assert [r['status'] for r in again] == ['finished', 'finished']  # retrained; the other one skipped
    assert len(list(out.glob(f'{victim.name}.damaged-*'))) == 1 and len(load_results(out)) == 2


def test_foreign_results_file_fails_that_run_only(toy, tmp_path):
    a, b = cfg(lr=0.1), cfg(lr=0.05)
    train(b, toy, tmp_path, 'cpu', progress=False)
    os.replace(run_paths(tmp_path, b)[0], run_paths(tmp_path, a)[0])  # b's results under a's name
    with pytest.raises(ValueError, match='belongs to another configuration'):
        train(a, toy, tmp_path, 'cpu', progress=False)


# ---- 4. data identity -------------------------------------------------------------------------------------------------------

def test_resume_on_other_data_is_refused(toy, tmp_path):
    c = cfg()
    train(c, toy, tmp_path, 'cpu', progress=False, stop_after=1)
    other = T.synthetic_cifar10(64, 32, 32, seed=5)
    with pytest.raises(RunFileError, match=r"written on other data.*seed.*\(0, 5\)"):
        train(c, other, tmp_path, 'cpu', progress=False)
    assert train(c, toy, tmp_path, 'cpu', progress=False)['resumed_at_epochs'] == [1]  # the right data resumes it


def test_finished_run_on_other_data_is_flagged(toy, tmp_path):
    c = cfg()
    r = train(c, toy, tmp_path, 'cpu', progress=False)
    with pytest.warns(RuntimeWarning, match='finished on other data'):
        assert train(c, T.synthetic_cifar10(64, 32, 32, seed=5), tmp_path, 'cpu', progress=False) == r


# ---- 7. the results folder ----------------------------------------------------------------------------------------------------

def test_out_that_is_a_file_fails_before_training(toy, tmp_path):
    (tmp_path / 'out').write_text('a file')
    with pytest.raises(OSError, match='out: a part of the path is a file'):
        train(cfg(), toy, tmp_path / 'out', 'cpu', progress=False)


@pytest.mark.parametrize('code,words', [(errno.ENOSPC, 'no space left on the device'), (errno.EROFS, 'the file system is read-only')])
def test_full_or_read_only_disk_gives_a_plain_message(toy, tmp_path, monkeypatch, code, words):
    real = RF._atomic_write
    def failing(path, write):
        if str(path).endswith('.ckpt'): return real(path, lambda tmp: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        return real(path, write)
    monkeypatch.setattr(RF, '_atomic_write', failing)
    with pytest.raises(OSError, match=rf'cannot write .*\.ckpt: {words}'):
        train(cfg(), toy, tmp_path, 'cpu', progress=False)
    assert not list(tmp_path.glob('.*.tmp'))


def test_cli_checks_out_before_loading_data(tmp_path, capsys):
    (tmp_path / 'out').write_text('a file')
    with pytest.raises(SystemExit) as e:
        experiment_main(['fig2', '--quick', '--out', str(tmp_path / 'out'), '--data', str(tmp_path / 'no-data-needed')])
    assert e.value.code == 1 and 'a part of the path is a file' in capsys.readouterr().err


# ---- 8. leftovers --------------------------------------------------------------------------------------------------------------

def test_dead_writers_temporary_files_and_stale_checkpoints_are_removed(toy, tmp_path):
    c = cfg()
    name, pid = run_name(c), dead_pid()
    tmp_ckpt = tmp_path / f'.{name}.ckpt.{pid}.tmp'
    tmp_ckpt.write_bytes(b'x' * 1000)  # a killed writer's partial checkpoint
    live = tmp_path / f'.{name}.json.{os.getppid()}.tmp'
    live.write_bytes(b'{')  # a live process's: left alone
    r = train(c, toy, tmp_path, 'cpu', progress=False)
    assert not tmp_ckpt.exists() and live.exists()
    ckpt = run_paths(tmp_path, c)[1]
    save_checkpoint(ckpt, dict(stale=True))  # a checkpoint next to a finished results file
    assert train(c, toy, tmp_path, 'cpu', progress=False) == r and not ckpt.exists()


# ---- 10. small ones ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('argv,msg', [(['--n-train', '45001'], 'the training set has 45,000 images'),
                                      (['--seed', str(2**70)], 'seed'),
                                      (['--device', 'mps'], "--device mps: 'mps' is not supported"),
                                      (['--device', 'meta'], "--device meta: 'meta' is not supported")])
def test_cli_refuses_before_loading_data(capsys, tmp_path, argv, msg):
    with pytest.raises(SystemExit) as e:
        experiment_main(['table1', '--out', str(tmp_path), '--data', str(tmp_path / 'none')] + argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_empty_batch_gives_a_zero_step():
    for mode, solver in [('prox_exact', 'auto'), ('prox_cg3', 'primal'), ('prox_cg3', 'matrix_free')]:
        conv = ProxPropConv2d(3, 4, 3, padding=1, optimization_mode=mode, solver=solver)
        conv(torch.randn(0, 3, 6, 6)).sum().backward()
        assert conv.weight.grad.abs().max() == 0


def test_tiny_tau_prox_and_odd_digits_are_refused():
    with pytest.raises(ValueError, match='1/tau_prox overflows float32'): check_prox_args(1e-39)
    check_prox_args(1e-38)  # still fine in float32
    for bad in ('prox_cg03', 'prox_cg\u0663', 'prox_cg\uff13'):
        with pytest.raises(ValueError, match="'prox_exact', 'prox_cgN'"): parse_mode(bad)


# ---- 11. two processes on one results folder -------------------------------------------------------------------------------------

def test_a_run_in_progress_elsewhere_is_skipped(toy, tmp_path):
    c = cfg()
    lock = tmp_path / f'.{run_name(c)}.lock'
    lock.write_text(json.dumps(dict(pid=os.getppid(), host=RF.socket.gethostname(), started='now')))  # a live holder
    r = train(c, toy, tmp_path, 'cpu', progress=False)
    assert r['status'] == 'running elsewhere' and r['holder']['pid'] == os.getppid()
    assert not run_paths(tmp_path, c)[0].exists() and lock.exists()
    lock.write_text(json.dumps(dict(pid=dead_pid(), host=RF.socket.gethostname(), started='then')))  # its holder died
    assert train(c, toy, tmp_path, 'cpu', progress=False)['status'] == 'finished'
    assert not lock.exists()  # released


def test_two_processes_on_one_folder_train_each_run_once(tmp_path):
    "Two sweeps started at once on the same --out: every run is trained by exactly one of them"
    code = f"""
import sys; sys.path.insert(0, {str(Path(T.__file__).parent.parent)!r})
import torch; torch.set_num_threads(1)
from proxprop_nb.lab.train import synthetic_cifar10
from proxprop_nb.lab.experiments import run_experiment
rows = run_experiment('table1', {str(tmp_path / 'out')!r}, synthetic_cifar10(64, 32, 32), 'cpu', progress=False, log=None,
                      methods=['backprop'], taus=[1, 0.5, 0.1, 0.05], sizes=(192, 64, 64, 64, 10), epochs=3)
print(' '.join(r['status'].replace(' ', '_') for r in rows))
"""
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    trained = [sum(o[i] in ('finished', 'diverged') for o in outs) for i in range(4)]
    assert all(t >= 1 for t in trained)  # every run trained by at least one (the second may find it done)
    for i in range(4): assert not ('running_elsewhere' in (outs[0][i], outs[1][i]) and trained[i] != 1)
    assert len(load_results(tmp_path / 'out')) == 4 and not list((tmp_path / 'out').glob('.*.lock'))
