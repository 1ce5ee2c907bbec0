"""The data-parallel ProxProp step: R gloo processes on 127.0.0.1 take the one-process step on the whole batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope='module', params=[(2, 'cpu'), (3, 'cpu'), (2, 'cuda')], ids=['R2', 'R3', 'R2-cuda'])
def results(request, tmp_path_factory):
    "Run tests/ddp_cases.py on R processes (on the CPU, or two sharing one GPU through gloo); {rank: results}"
    (world, device), tmp = request.param, tmp_path_factory.mktemp(f'ddp{request.param[0]}')
    if device == 'cuda' and not torch.cuda.is_available(): pytest.skip('no CUDA device')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / 'ddp_cases.py'), str(r), str(world), port, str(tmp / f'{r}.json'), device],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try: logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs: q.kill()
            pytest.fail('the gloo processes did not finish in 300 s')
    out = {}
    for r in range(world):
        f = tmp / f'{r}.json'
        assert f.is_file(), logs[r][-3000:]
        out[r] = json.loads(f.read_text())
        assert 'crash' not in out[r], out[r].get('crash')
    assert [p.returncode for p in procs] == [0] * world, '\n'.join(l[-3000:] for l in logs)  # a clean end, on every process
    return world, out


def test_global_step_equals_the_one_process_step(results):
    world, out = results
    for r, res in out.items():
        cases = {k: v for k, v in res.items() if k.startswith('equal/')}
        assert len(cases) >= 30
        bad = {k: v for k, v in cases.items() if v['rel'] > 1e-10}
        assert not bad, (world, r, bad)


def test_routes_are_the_ones_asked_for(results):
    _, out = results
    res = out[0]
    assert all(r.startswith('gather>') for r in res['equal/mlp/cg3/gather']['routes'])  # then any one-process route
    assert res['equal/mlp/exact-dual/gather']['routes'] == res['equal/mlp/cg3-dual/gather']['routes'] == ['gather>dual']
    assert res['equal/mlp/exact/gram']['routes'] == ['gram'] and res['equal/mlp/cg3/cg']['routes'] == ['cg']
    assert res['equal/convnet/cg3/gram']['routes'] == ['gram'] and res['equal/otherconv/cg3/cg']['routes'] == ['cg']


def test_frozen_bias_and_a_failed_backward(results):
    "A layer with a frozen bias takes the global step by gathering; a backward that raised leaves nothing queued"
    _, out = results
    for res in out.values():
        for k in ('equal/frozen-bias/mlp/exact', 'equal/frozen-bias/convnet/cg3'):
            assert res[k]['untouched'] and res[k]['routes'][0].startswith('gather>'), res[k]
        assert res['raised'] == 'boom' and res['equal/after-failed-backward']['pending'] == 0


def test_local_mode_is_each_process_own_step(results):
    _, out = results
    assert out[0]['local/differs']['rel'] > 1e-3  # a different algorithm: what DDP gives without the global step


def test_ddp_still_broadcasts_the_initial_parameters(results):
    _, out = results
    assert all(res['broadcast']['equal'] for res in out.values())


def test_counted_bytes_match_the_formulas(results):
    _, out = results
    for res in out.values():
        cases = {k: v for k, v in res.items() if k.startswith('bytes/')}
        assert len(cases) == 6
        assert all(v['counted'] == v['formula'] for v in cases.values()), cases


@pytest.mark.parametrize('case, words', [('unequal', 'equal local batches'), ('no_sync', 'no_sync()'), ('join', 'join()'),
                                         ('global_without_ddp', 'DistributedDataParallel'), ('fsdp2', 'DistributedDataParallel'),
                                         ('calls_differ', 'same ProxProp layer calls')])
def test_what_cannot_be_global_is_refused_everywhere(results, case, words):
    _, out = results
    for res in out.values():
        assert res[f'refuse/{case}'] is not None and words in res[f'refuse/{case}'], res[f'refuse/{case}']


def _torchrun_like(world, out, stop):
    "Start `world` processes of tests/ddp_train.py with the environment torchrun gives them"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / 'ddp_train.py'), str(out), str(stop)],
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                                       MASTER_PORT=port, OMP_NUM_THREADS='1'),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(l[-2000:] for l in logs)
    return [json.loads((out / f'rank{r}.json').read_text()) for r in range(world)]


def test_training_on_two_processes_gives_the_one_process_losses(tmp_path):
    "train() under a torchrun-like launch: equal shares of every minibatch, rank 0 writes, a restart resumes"
    sys.path.insert(0, str(HERE))
    from ddp_train import CFG
    from proxprop_nb.lab.train import RunConfig, train, synthetic_cifar10, run_paths
    torch.set_num_threads(1)
    one = train(RunConfig(**CFG), synthetic_cifar10(n_train=64), None, 'cpu', progress=False)
    out = tmp_path / 'two'
    first = _torchrun_like(2, out, stop=1)  # stopped after one epoch: a checkpoint, no results file
    assert [r['status'] for r in first] == ['stopped', 'stopped']
    results, ckpt = run_paths(out, RunConfig(**CFG))
    assert ckpt.exists() and not results.exists()
    again = _torchrun_like(2, out, stop=0)  # the restart resumes from rank 0's checkpoint
    assert [r['status'] for r in again] == ['finished', 'finished'] and again[0]['data_parallel'] == dict(processes=2, backend='gloo')
    stored = json.loads(results.read_text())
    assert stored['resumed_at_epochs'] == [1] and stored['data_parallel']['processes'] == 2
    for key in ('train_loss', 'val_loss', 'minibatch_loss'):
        a, b = one['history'][key], stored['history'][key]
        assert a[0] == b[0] or key == 'minibatch_loss'  # epoch 0: the same initial model
        assert max(abs(x - y) / abs(y) for x, y in zip(a[1:], b[1:])) < 1e-4, (key, a, b)  # float32, summed in another order
    assert again[0]['history']['train_loss'] == again[1]['history']['train_loss']  # every process saw the same numbers


EXIT_SCRIPT = """
import os, sys, torch.distributed as dist
from proxprop_nb.distributed import exit_process_group
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if world > 1:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    dist.init_process_group('gloo', rank=rank, world_size=world)
print(f'rank {rank} done', end='')  # buffered (stdout is a pipe): lost unless exit_process_group flushes it
import atexit; atexit.register(print, 'atexit ran')
exit_process_group(3 + rank)
print('after exit_process_group')
"""


@pytest.mark.parametrize('world', [1, 2])
def test_exit_process_group_closes_the_group_and_ends_with_the_code(tmp_path, world):
    "Every process waits for the others, flushes what it printed, and ends with its exit status, without atexit handlers"
    (tmp_path / 'exit.py').write_text(EXIT_SCRIPT)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(tmp_path / 'exit.py'), str(r), str(world), port],
                              env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [3 + r for r in range(world)], outs
    assert [o for o, _ in outs] == [f'rank {r} done' for r in range(world)], outs  # flushed; nothing after; no atexit handler ran
