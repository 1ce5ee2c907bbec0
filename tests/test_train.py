"""The training loop (proxprop_nb.lab.train): divergence, resume, skipping, results files, models and optimizers."""
import itertools
import json
import math

import pytest
import torch

import proxprop_nb
import proxprop_nb.lab.train as T
from proxprop_nb.lab.train import reproducible_history
from proxprop_nb.lab.train import (RunConfig, convnet, evaluate, make_optimizer, mlp, prepare_data, read_json, run_name, run_paths,
                               synthetic_cifar10, train, write_json)

DEEP = (192, 256, 256, 256, 10)  # a toy MLP that BackProp drives to NaN at tau = 50 (a shallow one loses its ReLUs first)
SMALL = dict(sizes=(192, 32, 16, 10), batch_size=16, epochs=3)




def _strict_json(path):
    "Parse a file as strict JSON (no NaN or Infinity)"
    def no_constants(c): raise ValueError(f'non-standard JSON constant {c}')
    return json.loads(path.read_text(), parse_constant=no_constants)




def test_divergence_is_recorded(toy, tmp_path):
    cfg = RunConfig(lr=50.0, sizes=DEEP, batch_size=16, epochs=6)
    r = train(cfg, toy, tmp_path, 'cpu', progress=False)
    assert r['status'] == 'diverged'
    assert r['diverged_at']['where'] in ('minibatch loss', 'full-batch loss') and 1 <= r['diverged_at']['epoch'] <= 6
    assert r['epochs_done'] < 6 and r['final_train_loss'] is None and r['test_acc'] is None and r['test_loss'] is None
    path, ckpt = run_paths(tmp_path, cfg)
    assert _strict_json(path)['status'] == 'diverged' and not ckpt.exists()
    assert len(r['history']['epoch']) == len(r['history']['train_loss'])


def test_train_epoch_stops_before_the_bad_step(toy):
    d = prepare_data(toy, RunConfig())
    torch.manual_seed(0)
    net = mlp(DEEP, optimization_mode='gradient')
    opt = make_optimizer(net.parameters(), 'sgd', 50.0)
    for epoch in range(1, 6):
        loss, step = T.train_epoch(net, opt, d.x_train, d.y_train, 8, T.epoch_generator(0, epoch))
        if step is not None: break
    assert step is not None and not math.isfinite(loss)


@pytest.mark.parametrize('optimizer,lr,mode', [('sgd', 1.0, 'prox_cg3'), ('adam', 1e-2, 'gradient')])
def test_resume_after_interrupt_equals_uninterrupted(toy, tmp_path, monkeypatch, optimizer, lr, mode):
    cfg = RunConfig(optimizer=optimizer, lr=lr, optimization_mode=mode, tau_prox=0.05, **SMALL)
    full = train(cfg, toy, None, 'cpu', progress=False)
    calls, real = [], T.train_epoch
    def interrupted(*a, **k):  # Ctrl-C in the middle of epoch 3
        calls.append(1)
        if len(calls) == 3: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, 'train_epoch', interrupted)
    with pytest.raises(KeyboardInterrupt): train(cfg, toy, tmp_path, 'cpu', progress=False)
    path, ckpt = run_paths(tmp_path, cfg)
    assert ckpt.exists() and not path.exists()
    assert T.load_checkpoint(ckpt)['epoch'] == 2
    monkeypatch.setattr(T, 'train_epoch', real)
    resumed = train(cfg, toy, tmp_path, 'cpu', progress=False)
    assert reproducible_history(resumed['history']) == reproducible_history(full['history'])
    assert (resumed['test_loss'], resumed['test_acc']) == (full['test_loss'], full['test_acc'])
    assert resumed['resumed_at_epochs'] == [2] and resumed['status'] == 'finished' and not ckpt.exists()


def test_stop_after_keeps_checkpoint_and_resumes(toy, tmp_path):
    cfg = RunConfig(lr=1.0, optimization_mode='prox_cg1', **SMALL)
    full = train(cfg, toy, None, 'cpu', progress=False)
    for done in (1, 2):
        part = train(cfg, toy, tmp_path, 'cpu', progress=False, stop_after=1)
        assert (part['status'], part['epochs_done']) == ('stopped', done)
    r = train(cfg, toy, tmp_path, 'cpu', progress=False)
    assert reproducible_history(r['history']) == reproducible_history(full['history']) and r['resumed_at_epochs'] == [1, 2]


def test_finished_run_is_skipped(toy, tmp_path, monkeypatch):
    cfg = RunConfig(lr=0.05, **SMALL)
    first = train(cfg, toy, tmp_path, 'cpu', progress=False)
    mtime = run_paths(tmp_path, cfg)[0].stat().st_mtime_ns
    monkeypatch.setattr(T, 'train_epoch', lambda *a, **k: pytest.fail('a finished run was trained again'))
    lines = []
    assert train(cfg, toy, tmp_path, 'cpu', progress=False, log=lines.append) == first
    assert run_paths(tmp_path, cfg)[0].stat().st_mtime_ns == mtime and 'skipped' in lines[0]


def test_other_configuration_under_the_same_name_is_refused(toy, tmp_path):
    cfg = RunConfig(lr=0.05, **SMALL)
    train(cfg, toy, tmp_path, 'cpu', progress=False)
    path = run_paths(tmp_path, cfg)[0]
    r = read_json(path)
    r['config']['seed'] = 7
    write_json(path, r)
    with pytest.raises(ValueError, match='belongs to another configuration'): train(cfg, toy, tmp_path, 'cpu', progress=False)


def test_results_json_contents(toy, tmp_path):
    cfg = RunConfig(lr=1.0, optimization_mode='prox_cg3', cg_variant='official', tau_prox=0.05, n_train=48, n_eval=20, **SMALL)
    r = train(cfg, toy, tmp_path, 'cpu', progress=False, meta=dict(experiment='fig2'))
    path = run_paths(tmp_path, cfg)[0]
    assert path.name == run_name(cfg) + '.json' == 'mlp-sgd-lr1-cg3-official-tauprox0.05-bs16-w192x32x16x10-n48-eval20-ep3-seed0.json'
    stored = _strict_json(path)
    assert stored == r
    for k in ('config', 'seed', 'status', 'history', 'test_loss', 'test_acc', 'environment', 'data', 'started', 'finished', 'meta'):
        assert k in stored, k
    assert RunConfig.from_dict(stored['config']) == cfg and stored['seed'] == 0 and stored['meta'] == dict(experiment='fig2')
    env = stored['environment']
    assert (env['proxprop_nb'], env['torch'], env['device']) == (proxprop_nb.__version__, torch.__version__, 'cpu')
    assert env['python'].count('.') == 2 and env['cpu'] and env['torch_threads'] == 1 and env['gpu'] is None
    assert stored['data']['kind'] == 'synthetic'
    assert (stored['data']['n_train_used'], stored['data']['n_val_used'], stored['data']['n_test_used']) == (48, 20, 20)
    h = stored['history']
    assert h['epoch'] == [0, 1, 2, 3] and all(len(v) == 4 for v in h.values())
    assert h['minibatch_loss'][0] is None and h['time'] == pytest.approx(list(itertools.accumulate(h['train_time'])))
    assert stored['started'] <= stored['finished'] and stored['final_train_loss'] == h['train_loss'][-1]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'r.json'
    write_json(path, dict(a=1.5, b=[float('nan'), float('-inf')]))
    assert read_json(path) == dict(a=1.5, b=[None, None])
    with pytest.raises(TypeError): write_json(path, dict(a=object()))
    assert read_json(path) == dict(a=1.5, b=[None, None])
    assert [p.name for p in tmp_path.iterdir()] == ['r.json']


def test_same_seed_same_batches_and_init():
    order = lambda e: torch.randperm(10, generator=T.epoch_generator(3, e)).tolist()
    assert order(2) == order(2) and order(2) != order(3)
    a, b = T.build_model(RunConfig(sizes=(12, 8, 3))), T.build_model(RunConfig(sizes=(12, 8, 3), optimization_mode='prox_cg3'))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # every method starts from the same weights
    state = torch.get_rng_state()
    T.build_model(RunConfig(sizes=(12, 8, 3), seed=5))
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone


def test_models():
    net = mlp((12, 8, 6, 3), optimization_mode='prox_cg3')
    assert [type(m).__name__ for m in net] == ['Flatten', 'ProxPropLinear', 'ReLU', 'ProxPropLinear', 'ReLU', 'Linear']
    assert net[1].optimization_mode == 'prox_cg3'
    official, paper = convnet('official'), convnet('paper')
    assert (official[-1].in_features, paper[-1].in_features) == (20 * 8 * 8, 20 * 4 * 4)
    assert [type(m).__name__ for m in official].count('ProxPropConv2d') == 3 and type(official[-1]) is torch.nn.Linear
    assert official(torch.rand(2, 3, 32, 32)).shape == paper(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_nesterov_is_footnote_2():
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = make_optimizer([theta], 'sgd', lr=0.5, momentum=0.9)
    ref, m = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for k in range(4):
        d = torch.tensor([1.0, -k, k * k], dtype=torch.float64)
        theta.grad = d.clone()
        opt.step()
        m = 0.9 * m + d
        ref = ref - 0.5 * (0.9 * m + d)
        assert torch.allclose(theta.detach(), ref, rtol=0, atol=1e-13)


def test_evaluate_is_chunk_independent(toy):
    d = prepare_data(toy, RunConfig())
    net = mlp((192, 16, 10))
    out = net(d.x_train).double()
    ref = torch.nn.functional.cross_entropy(out, d.y_train).item(), (out.argmax(1) == d.y_train).double().mean().item()
    for bs in (5, 64, 1000): assert evaluate(net, d.x_train, d.y_train, bs) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize('bad,msg', [(dict(lr=0), 'lr=0'), (dict(lr=float('inf')), 'lr=inf'), (dict(model='resnet'), "model='resnet'"),
                                     (dict(optimizer='rmsprop'), "optimizer='rmsprop'"), (dict(epochs=0), 'epochs=0'),
                                     (dict(optimization_mode='prox_cg'), 'optimization_mode'), (dict(arch='x'), "arch='x'")])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(')): RunConfig(**bad)
