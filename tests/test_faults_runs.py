"""Faults of a run's files (hardening, round two): planted links at temporary names, corrupted checkpoints, stale
or foreign locks, results files that parse but are not results, empty splits, a MemoryError while a checkpoint is
serialised, and a byte-identical copy of the data at another path. Each ends in a clear message or a correct
result, with nothing lost; each test failed on the code before the change."""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import proxprop_nb.lab.runfiles as RF
import proxprop_nb.lab.train as T
from proxprop_nb.lab.data import load_cifar10
from proxprop_nb.lab.runfiles import save_checkpoint, load_checkpoint, write_json
from proxprop_nb.lab.train import RunConfig, RunFileError, run_name, run_paths, train, read_json

SMALL = dict(sizes=(192, 16, 10), batch_size=16, epochs=2)
HOST = RF.socket.gethostname()


def cfg(**kw): return RunConfig(**{**SMALL, **kw})


def dead_pid() -> int:
    "The pid of a process that has ended"
    p = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    return int(p.stdout)


@pytest.fixture
def sleeper():
    "A live process that is not a run: its pid stands for a pid reused after a run died"
    p = subprocess.Popen(['sleep', '60'])
    time.sleep(0.05)
    yield p.pid
    p.kill(); p.wait()


def plant_link(at: Path, target: Path):
    "A symlink at `at` to `target` (the file a hostile user wants overwritten)"
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, at)


def age(path: Path, seconds=3600):
    "Set the modification time of `path` (not of a link's target) `seconds` into the past"
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


# ---- 2. files: planted links at predictable temporary names ------------------------------------------------

def test_planted_links_at_temporary_names_are_not_followed(toy, tmp_path):
    c, pid = cfg(), os.getpid()
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    out, name = tmp_path / 'out', run_name(c)
    for at in (f'.{name}.json.{pid}.tmp', f'.{name}.ckpt.{pid}.tmp', f'.{name}.probe.{pid}'):
        plant_link(out / at, victim)
    r = train(c, toy, out, 'cpu', progress=False)
    assert r['status'] == 'finished' and victim.read_text() == 'precious'
    path = run_paths(out, c)[0]
    assert not path.is_symlink() and read_json(path)['name'] == name


def test_write_json_and_save_checkpoint_never_write_through_a_link(tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    for f in ('r.json', 'r.ckpt'):
        plant_link(tmp_path / f'.{f}.{os.getpid()}.tmp', victim)
    write_json(tmp_path / 'r.json', dict(a=1))
    save_checkpoint(tmp_path / 'r.ckpt', dict(a=torch.ones(2)))
    assert victim.read_text() == 'precious' and read_json(tmp_path / 'r.json') == dict(a=1)
    assert not (tmp_path / 'r.json').is_symlink() and not (tmp_path / 'r.ckpt').is_symlink()


def test_prepare_out_dir_does_not_truncate_a_linked_probe(tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    plant_link(tmp_path / 'out' / f'.run.probe.{os.getpid()}', victim)
    RF.prepare_out_dir(tmp_path / 'out', 'run')
    assert victim.read_text() == 'precious'


# ---- 2. files: checkpoints carry a checksum ----------------------------------------------------------------

def flip_a_weight(ckpt: Path):
    "Change the bytes of one float of the model's first weight in place, as a bad disk or RAM would"
    s = torch.load(ckpt, weights_only=True)
    w = next(iter(s['model'].values())).contiguous()
    raw, data = bytearray(ckpt.read_bytes()), w.numpy().tobytes()
    at = raw.find(data)
    assert at > 0
    raw[at + 3] ^= 0x40  # the exponent of the first float: it becomes huge
    ckpt.write_bytes(bytes(raw))
    return w


def test_flipped_bytes_in_a_checkpoint_are_detected(toy, tmp_path):
    c = cfg(epochs=3)
    full = train(c, toy, None, 'cpu', progress=False)
    train(c, toy, tmp_path, 'cpu', progress=False, stop_after=1)
    ckpt = run_paths(tmp_path, c)[1]
    w = flip_a_weight(ckpt)
    assert not torch.equal(next(iter(torch.load(ckpt, weights_only=True)['model'].values())), w)  # it loads
    with pytest.raises(RunFileError, match='checksum'): load_checkpoint(ckpt)
    with pytest.warns(RuntimeWarning, match=rf'{ckpt.name} is damaged: its checksum.*moved to {ckpt.name}\.damaged-'):
        r = train(c, toy, tmp_path, 'cpu', progress=False)
    assert r['status'] == 'finished' and r['resumed_at_epochs'] == []  # started again, not resumed
    assert r['history']['train_loss'] == full['history']['train_loss']
    assert len(list(tmp_path.glob(f'{ckpt.name}.damaged-*'))) == 1


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    state = {k: None for k in RF._CKPT_KEYS} | dict(epoch=2, model={'w': torch.arange(3.)})
    torch.save(state, tmp_path / 'old.ckpt')  # as save_checkpoint wrote it before checksums
    assert load_checkpoint(tmp_path / 'old.ckpt')['epoch'] == 2


# ---- 3. locks ----------------------------------------------------------------------------------------------

def lock_of(out: Path, c) -> Path: return out / f'.{run_name(c)}.lock'


@pytest.mark.parametrize('content', [b'', b'\x00\xff garbage', b'[]', b'{"pid": "x"}', 'link'])
def test_an_empty_or_garbage_lock_is_taken_over_with_a_warning(toy, tmp_path, content):
    c = cfg()
    lock = lock_of(tmp_path, c)
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    if content == 'link': plant_link(lock, victim)
    else: lock.write_bytes(content)
    age(lock)  # not one being written right now
    with pytest.warns(RuntimeWarning, match=rf'{lock.name}.*taken over'):
        r = train(c, toy, tmp_path, 'cpu', progress=False)
    assert r['status'] == 'finished' and not lock.exists() and victim.read_text() == 'precious'


def test_a_dead_holders_lock_is_taken_over_with_a_warning(toy, tmp_path):
    c = cfg()
    lock = lock_of(tmp_path, c)
    lock.write_text(json.dumps(dict(pid=dead_pid(), host=HOST, started='then')))
    with pytest.warns(RuntimeWarning, match=r'is not running.*taken over'):
        assert train(c, toy, tmp_path, 'cpu', progress=False)['status'] == 'finished'


def test_a_lock_whose_pid_was_reused_is_taken_over(toy, tmp_path, sleeper):
    c = cfg()
    lock = lock_of(tmp_path, c)
    lock.write_text(json.dumps(dict(pid=sleeper, host=HOST, started='then')))  # an older lock, no start time
    age(lock)  # written an hour before the process with that pid started
    with pytest.warns(RuntimeWarning, match=rf'pid {sleeper} .*started after the lock.*taken over'):
        assert train(c, toy, tmp_path, 'cpu', progress=False)['status'] == 'finished'


def test_a_lock_with_another_process_start_time_is_taken_over(toy, tmp_path, sleeper):
    c = cfg(seed=1)
    lock = lock_of(tmp_path, c)
    record = dict(pid=sleeper, host=HOST, started='then', process_started=RF.process_start_time(sleeper) - 100,
                  token='ab')
    lock.write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match=rf'pid {sleeper} .*taken over'):
        assert train(c, toy, tmp_path, 'cpu', progress=False)['status'] == 'finished'


def test_a_live_holders_lock_is_respected_and_said(toy, tmp_path, sleeper):
    c = cfg()
    lock = lock_of(tmp_path, c)
    record = dict(pid=sleeper, host=HOST, started='now', process_started=RF.process_start_time(sleeper),
                  token='ab')
    lock.write_text(json.dumps(record))
    with pytest.warns(RuntimeWarning, match=rf'{run_name(c)}: running in another process.*{lock.name}'):
        r = train(c, toy, tmp_path, 'cpu', progress=False)  # no log: a warning says it
    assert r['status'] == 'running elsewhere' and lock.exists() and json.loads(lock.read_text()) == record
    assert str(lock) in r['error'] and f'delete {lock}' in r['error'] and '--force-unlock' in r['error']


def test_a_lock_from_another_host_is_reported_with_how_to_clear_it(toy, tmp_path):
    c = cfg()
    lock = lock_of(tmp_path, c)
    lock.write_text(json.dumps(dict(pid=1, host='elsewhere.example', started='then', token='cd')))
    with pytest.warns(RuntimeWarning, match=rf'{lock.name} is held by pid 1 on host elsewhere.example.*delete'):
        r = train(c, toy, tmp_path, 'cpu', progress=False)  # no log: a warning says it
    assert r['status'] == 'running elsewhere' and lock.exists() and f'--force-unlock {run_name(c)}' in r['error']
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # with a log: one line there, no warning
        r = train(c, toy, tmp_path, 'cpu', progress=False, log=lines.append)
    assert r['status'] == 'running elsewhere' and lines == [r['error']]
    assert RF.force_unlock(tmp_path, run_name(c))['host'] == 'elsewhere.example' and not lock.exists()
    assert RF.force_unlock(tmp_path, run_name(c)) is None  # nothing left to clear
    assert train(c, toy, tmp_path, 'cpu', progress=False)['status'] == 'finished'


def test_a_lock_records_host_pid_start_time_and_token(tmp_path):
    lock = RF.take_run_lock(tmp_path, 'run')
    record = json.loads(lock.read_text())
    assert (record['host'], record['pid']) == (HOST, os.getpid()) and len(record['token']) >= 16
    assert abs(record['process_started'] - RF.process_start_time(os.getpid())) < 1e-6
    RF.release_run_lock(lock)
    assert not lock.exists()


def test_releasing_leaves_a_lock_taken_by_another_process_alone(tmp_path, sleeper):
    lock = RF.take_run_lock(tmp_path, 'run')
    theirs = dict(pid=sleeper, host=HOST, started='now', process_started=RF.process_start_time(sleeper),
                  token='ef')
    lock.write_text(json.dumps(theirs))  # force-unlocked meanwhile, and taken by another run
    RF.release_run_lock(lock)
    assert json.loads(lock.read_text()) == theirs


# ---- 6. results files that parse but are not results -------------------------------------------------------

BROKEN = {'no name': lambda r: r.pop('name'), 'history=5': lambda r: r.update(history=5),
          'history without epochs': lambda r: r['history'].pop('epoch'),
          'unknown status': lambda r: r.update(status='bogus'), 'data=[]': lambda r: r.update(data=[])}


@pytest.mark.parametrize('damage', list(BROKEN))
def test_a_results_file_that_is_not_results_is_moved_aside_and_the_run_trains_again(toy, tmp_path, damage):
    c = cfg()
    first = train(c, toy, tmp_path, 'cpu', progress=False)
    path = run_paths(tmp_path, c)[0]
    r = read_json(path); BROKEN[damage](r); write_json(path, r)
    with pytest.warns(RuntimeWarning, match=rf'{path.name} is damaged.*moved to {path.name}\.damaged-'):
        again = train(c, toy, tmp_path, 'cpu', progress=False, log=lambda s: None)
    assert again['status'] == 'finished' and again['history']['train_loss'] == first['history']['train_loss']
    assert len(list(tmp_path.glob(f'{path.name}.damaged-*'))) == 1 and read_json(path)['name'] == run_name(c)


@pytest.mark.parametrize('split', ['test', 'val', 'train'])
def test_an_empty_split_is_refused_before_training(toy, tmp_path, monkeypatch, split):
    empty = replace(toy, **{f'x_{split}': toy.x_test[:0], f'y_{split}': toy.y_test[:0]})
    monkeypatch.setattr(T, 'train_epoch', lambda *a, **k: pytest.fail('trained'))
    with pytest.raises(ValueError, match=rf'no {split}\w* images'):
        train(cfg(), empty, tmp_path, 'cpu', progress=False)
    assert not list(tmp_path.glob('*.json')) and not list(tmp_path.glob('*.ckpt'))


def failing_save(monkeypatch, failing_calls):
    "torch.save raising MemoryError on the given calls (1 = the first)"
    calls, real = [], torch.save
    def save(*a, **k):
        calls.append(1)
        if len(calls) in failing_calls: raise MemoryError()
        return real(*a, **k)
    monkeypatch.setattr(torch, 'save', save)


def test_a_memory_error_while_saving_a_checkpoint_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    f = tmp_path / 'r.ckpt'
    save_checkpoint(f, dict(a=torch.ones(2)))
    failing_save(monkeypatch, {1})
    with pytest.raises(OSError, match=rf'cannot write {f}: out of memory'): save_checkpoint(f, dict(a=torch.zeros(2)))
    assert torch.equal(torch.load(f, weights_only=True)['a'], torch.ones(2)) and os.listdir(tmp_path) == ['r.ckpt']


def test_a_memory_error_in_a_checkpoint_loses_no_state(toy, tmp_path, monkeypatch):
    c = cfg(epochs=3)
    full = train(c, toy, None, 'cpu', progress=False)
    failing_save(monkeypatch, {2})  # the checkpoint after epoch 2
    ckpt = run_paths(tmp_path, c)[1]
    with pytest.warns(RuntimeWarning, match=rf'cannot write {ckpt}: out of memory.*goes on'):
        r = train(c, toy, tmp_path, 'cpu', progress=False)
    assert r['status'] == 'finished' and r['history']['train_loss'] == full['history']['train_loss']
    monkeypatch.undo()
    failing_save(monkeypatch, {2})
    c2 = replace(c, seed=1)
    with pytest.warns(RuntimeWarning, match='out of memory'):
        part = train(c2, toy, tmp_path, 'cpu', progress=False, stop_after=2)
    assert part['status'] == 'stopped' and load_checkpoint(run_paths(tmp_path, c2)[1])['epoch'] == 1
    monkeypatch.undo()
    resumed = train(c2, toy, tmp_path, 'cpu', progress=False)
    alone = train(c2, toy, None, 'cpu', progress=False)
    assert resumed['resumed_at_epochs'] == [1]
    assert T.reproducible_history(resumed['history']) == T.reproducible_history(alone['history'])


# ---- 4. data identity by content ---------------------------------------------------------------------------

def write_batches(d: Path, n=8, seed=0):
    "A fake cifar-10-batches-py folder at `d` with `n` images per batch"
    import pickle
    from proxprop_nb.lab import sources
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    for name in sources._BATCHES:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (d / name).write_bytes(pickle.dumps({'data': x, 'labels': list(rng.integers(0, 10, n))}, protocol=2))


def test_a_byte_identical_copy_of_the_data_at_another_path_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv('PROXPROP_CACHE', str(tmp_path / 'cache'))
    write_batches(tmp_path / 'a' / 'cifar-10-batches-py')
    time.sleep(0.01)
    shutil.copytree(tmp_path / 'a', tmp_path / 'b', copy_function=shutil.copyfile)  # new mtimes, as `cp` gives
    here, there = (load_cifar10(tmp_path / p / 'cifar-10-batches-py', download=False, n_val=8) for p in 'ab')
    assert here.source['path'] != there.source['path'] and torch.equal(here.x_train, there.x_train)
    c = RunConfig(sizes=(3072, 16, 10), batch_size=8, epochs=2)
    train(c, here, tmp_path / 'out', 'cpu', progress=False, stop_after=1)
    r = train(c, there, tmp_path / 'out', 'cpu', progress=False)
    assert r['resumed_at_epochs'] == [1] and r['status'] == 'finished'
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "finished on other data"
        assert train(c, here, tmp_path / 'out', 'cpu', progress=False) == r
    write_batches(tmp_path / 'c' / 'cifar-10-batches-py', seed=1)  # other images: still refused
    other = load_cifar10(tmp_path / 'c' / 'cifar-10-batches-py', download=False, n_val=8)
    train(replace(c, seed=1), here, tmp_path / 'out', 'cpu', progress=False, stop_after=1)
    with pytest.raises(RunFileError, match='written on other data'):
        train(replace(c, seed=1), other, tmp_path / 'out', 'cpu', progress=False)


def test_a_folder_where_the_lock_belongs_is_named(tmp_path):
    "A folder at the lock's path: a one-line error naming it and what to do (a raw OSError from the take-over before)"
    from proxprop_nb.lab.runfiles import take_run_lock
    (tmp_path / '.run.lock').mkdir()
    with pytest.raises(IsADirectoryError, match=r"lock file .*\.run\.lock is a folder: move it away and rerun"):
        take_run_lock(tmp_path, 'run')
    assert (tmp_path / '.run.lock').is_dir()  # left as it was
