"""Tests of the optimizer comparison (proxprop_nb.lab.compare, compare_run and compare_report): networks, methods, text data,
settings and plan, the time-budgeted run, the command line, and the summaries, against independent computations."""
import dataclasses
import math
import statistics
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proxprop_nb.lab.compare import (NETWORKS, METHODS, SETTINGS, TAU_PROX, ResNetCifar, TransformerLM, build_network, prox_layers,
                                 muon_layers, make_method, stdlib_text, lr_grid, make_run, CompareRun, choose_lr, compare_plan, sweep)
from proxprop_nb.lab.compare_run import run_compare, load_records, compare_data, evaluate_lm_or_images, run_setting, main, estimate_s
from proxprop_nb.lab.compare_report import chosen_runs, time_to_target, summarize, format_summary, targets, describe_records
from proxprop_nb.layers import ProxPropMixin
from proxprop_nb.lab.runfiles import write_json

torch.set_num_threads(1)


# --- networks -------------------------------------------------------------------------------------------------------

def test_resnet20_structure():
    net = ResNetCifar()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 19
    # weights counted by hand: stem, stage 1 (6 convs 16->16), stage 2 (16->32, then 5 of 32->32), stage 3 (32->64, 5 of 64->64)
    conv_w = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 + 5 * 32) * 32 * 9 + (32 + 5 * 64) * 64 * 9
    assert sum(c.weight.numel() for c in convs) == conv_w
    x = torch.rand(3, 3, 32, 32)
    assert net(x).shape == (3, 10)
    feats = net.layers(torch.relu(net.bn(net.conv(x))))
    assert feats.shape == (3, 64, 8, 8)  # two stride-2 stages


def test_resnet_shortcut_is_zero_padded_identity():
    from proxprop_nb.lab.compare import BasicBlock
    b = BasicBlock(4, 8, stride=2).eval()
    for m in (b.conv1, b.conv2): nn.init.zeros_(m.weight)  # the residual branch is 0 (BatchNorm of 0 in eval mode: its shift, 0)
    x = torch.randn(2, 4, 6, 6)
    out = b(x)
    expected = torch.relu(torch.cat([torch.zeros(2, 2, 3, 3), x[:, :, ::2, ::2], torch.zeros(2, 2, 3, 3)], 1))
    torch.testing.assert_close(out, expected)


def test_transformer_is_causal_and_matches_manual_attention():
    torch.manual_seed(0)
    lm = TransformerLM(d_model=16, n_layer=1, n_head=2, ctx=8).double()
    idx = torch.randint(0, 256, (2, 8))
    out = lm(idx)
    for t in range(8):  # changing tokens after t leaves the logits at t unchanged
        idx2 = idx.clone(); idx2[:, t + 1:] = (idx2[:, t + 1:] + 7) % 256
        torch.testing.assert_close(lm(idx2)[:, :t + 1], out[:, :t + 1])
    # attention by hand, against scaled_dot_product_attention
    att = lm.blocks[0].attn
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    q, k, v = (f(x).view(2, 8, 2, 8).transpose(1, 2) for f in (att.q, att.k, att.v))
    s = q @ k.transpose(-1, -2) / math.sqrt(8) + torch.triu(torch.full((8, 8), -math.inf, dtype=torch.float64), 1)
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 16)
    torch.testing.assert_close(att(x), att.o(y))
    with pytest.raises(ValueError, match='context is 8'): lm(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match='not divisible'): TransformerLM(d_model=10, n_head=4)


def test_build_network_is_seeded_and_plain():
    a, b, c = (build_network('convnet', seed=s) for s in (0, 0, 1))
    assert not any(isinstance(m, ProxPropMixin) for m in a.modules())
    torch.testing.assert_close(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    state = torch.get_rng_state()
    build_network('lm', (16, 1, 2, 8))
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone
    with pytest.raises(ValueError, match='network=.x. is not valid'): build_network('x')


@pytest.mark.parametrize('network,sizes,n_prox,n_muon', [('mlp', (12, 8, 6, 3), 2, 1), ('convnet', (3, 4, 4, 4), 3, 2),
                                                          ('resnet20', (4, 1), 7, 6), ('lm', (16, 2, 2, 8), 12, 12)])
def test_prox_and_muon_layers(network, sizes, n_prox, n_muon):
    net = build_network(network, sizes)
    assert (len(prox_layers(net, network)), len(muon_layers(net, network))) == (n_prox, n_muon)
    make_method(net, network, 'exact-adamw', 1e-3)
    converted = [n for n, m in net.named_modules() if isinstance(m, ProxPropMixin)]
    assert converted == prox_layers(build_network(network, sizes), network)
    assert all(m.optimization_mode == 'prox_exact' and m.tau_prox == TAU_PROX for m in net.modules() if isinstance(m, ProxPropMixin))
    # explicit: the last Linear (mlp, convnet, resnet20) or the head (lm), embeddings and norms
    plain = [type(m) for n, m in net.named_modules() if type(m) in (nn.Linear, nn.Embedding, nn.LayerNorm, nn.BatchNorm2d)]
    assert nn.Linear in plain


# --- methods --------------------------------------------------------------------------------------------------------

def test_optimizers_of_methods():
    for method, cls in [('bp-sgd', torch.optim.SGD), ('bp-adamw', torch.optim.AdamW), ('cg3-sgd', torch.optim.SGD)]:
        opt = make_method(build_network('mlp', (12, 8, 3)), 'mlp', method, 0.1)
        assert type(opt) is cls
    sgd = make_method(build_network('mlp', (12, 8, 3)), 'mlp', 'exact-sgd', 0.1)
    assert sgd.param_groups[0]['nesterov'] and sgd.param_groups[0]['momentum'] == 0.9
    po = pytest.importorskip('pytorch_optimizer')
    assert type(make_method(build_network('mlp', (12, 8, 3)), 'mlp', 'soap', 1e-3)) is po.SOAP
    net = build_network('resnet20', (4, 1))
    opt = make_method(net, 'resnet20', 'muon', 0.02)
    hidden = {id(net.get_submodule(n).weight) for n in muon_layers(net, 'resnet20')}
    assert {id(p) for p in opt.param_groups[0]['params']} == hidden and opt.param_groups[0]['use_muon']
    assert id(net.conv.weight) not in hidden and id(net.fc.weight) not in hidden  # input layer and classifier: AdamW
    assert opt.param_groups[1]['lr'] == 1e-3 and not opt.param_groups[1]['use_muon']
    with pytest.raises(ValueError, match="method='adam' is not valid"): make_method(net, 'resnet20', 'adam', 1e-3)
    with pytest.raises(ValueError, match='lr=nan is not valid'): make_method(net, 'resnet20', 'bp-sgd', math.nan)


def test_prox_linear_on_3d_inputs_against_dense_solve():
    "cg3 on a 3-D input: .grad is the 3-step CG iterate for (A^T A + I/tau) X = grad with A the flattened input"
    torch.manual_seed(1)
    net = build_network('lm', (8, 1, 2, 4)).double()
    make_method(net, 'lm', 'exact-sgd', 0.1)
    layer = net.blocks[0].mlp[0]
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    g = torch.randn(3, 4, 32, dtype=torch.float64)
    layer(x).backward(g)
    A = torch.cat([x.reshape(-1, 8), torch.ones(12, 1, dtype=torch.float64)], 1)
    grad = g.reshape(-1, 32).T @ A
    X = torch.linalg.solve(A.T @ A + torch.eye(9, dtype=torch.float64) / TAU_PROX, grad.T).T
    torch.testing.assert_close(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1), X)


# --- text -----------------------------------------------------------------------------------------------------------

def test_stdlib_text_is_reproducible_and_split_by_file(tmp_path):
    for i in range(8): (tmp_path / f'm{i}.py').write_bytes(bytes([65 + i]) * (1000 + 100 * i))
    (tmp_path / 'notes.txt').write_text('not python')
    t = stdlib_text(3000, seed=0, root=tmp_path)
    assert t.source['bytes'] >= 3000 and set(t.source['files']) <= {f'm{i}.py' for i in range(8)}
    # every file lies wholly in one split: each split holds whole runs of its files' letters
    letters = [set(s.tolist()) for s in (t.test, t.val, t.train)]
    assert all(not (a & b) for a, b in [(letters[0], letters[1]), (letters[0], letters[2]), (letters[1], letters[2])])
    assert t.source == stdlib_text(3000, seed=0, root=tmp_path).source
    everything = stdlib_text(None, root=tmp_path)
    assert sorted(everything.source['files']) == [f'm{i}.py' for i in range(8)] and everything.source['bytes'] == sum(1000 + 100 * i for i in range(8))
    import hashlib
    blob = b''.join((tmp_path / f).read_bytes() for f in everything.source['files'])
    assert everything.source['sha256'] == hashlib.sha256(blob).hexdigest()
    with pytest.raises(ValueError, match='n_bytes=0 is not valid'): stdlib_text(0, root=tmp_path)
    with pytest.raises(ValueError, match='at least 3'): stdlib_text(root=tmp_path / 'nothing-here')


def test_text_windows_and_lm_evaluation():
    run = make_run('quick', 'lm', 'bp-sgd', 0.3)
    d = compare_data(run)
    x, y = d['val']
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    net = build_network('lm', run.sizes)
    loss, acc = evaluate_lm_or_images(net, x, y, chunk=5)
    logits = net(x).reshape(-1, 256).double()
    assert math.isclose(loss, F.cross_entropy(logits, y.reshape(-1)).item(), rel_tol=1e-6)
    assert acc == (logits.argmax(1) == y.reshape(-1)).double().mean().item()


# --- settings and plan ----------------------------------------------------------------------------------------------

def test_lr_grids_and_runs():
    assert all(len(lr_grid(n, m)) == 3 for n in NETWORKS for m in METHODS)
    assert lr_grid('mlp', 'cg3-adamw') == lr_grid('mlp', 'bp-adamw')
    r = make_run('full', 'resnet20', 'soap', 3e-3, 2)
    assert (r.budget_s, r.batch_size, r.name) == (SETTINGS['full'].nets['resnet20'].budget_s, 128, 'full-resnet20-soap-lr0.003-seed2')
    assert CompareRun.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="network='x' is not valid"): make_run('quick', 'x', 'soap', 1e-3)


def _fake(run, val, status='finished'):
    "A made-up record of `run` whose final validation accuracy and loss are `val`"
    return dict(name=run.name, status=status, final=dict(val_acc=val, val_loss=val, train_loss=1.0), run=run.to_dict(),
                setting=run.setting, network=run.network, method=run.method, seed=run.seed, steps=10,
                history=dict(time=[0.0, 1.0], train_loss=[2.0, 1.0], val_acc=[0.1, val], val_loss=[2.0, val]),
                test_acc=val, test_loss=val)


def test_choose_lr_and_plan_growth():
    sweep = compare_plan('reduced', networks=['lm'], methods=['soap'])
    assert [r.lr for r in sweep] == list(lr_grid('lm', 'soap')) and {r.seed for r in sweep} == {0}
    recs = {r.name: _fake(r, {1e-3: 0.3, 3e-3: 0.1, 1e-2: 0.2}[r.lr]) for r in sweep}
    assert choose_lr(recs, 'reduced', 'lm', 'soap') == 3e-3  # lm: the lowest validation loss
    grown = compare_plan('reduced', recs, networks=['lm'], methods=['soap'])
    assert [(r.lr, r.seed) for r in grown[3:]] == [(choose_lr(recs, 'reduced', 'lm', 'soap'), s) for s in (1, 2)]
    img = {r.name: _fake(r, {1e-3: 0.3, 3e-3: 0.1, 1e-2: 0.2}[r.lr]) for r in compare_plan('reduced', networks=['mlp'], methods=['soap'])}
    assert choose_lr(img, 'reduced', 'mlp', 'soap') == 1e-3  # images: the highest validation accuracy
    del img[make_run('reduced', 'mlp', 'soap', 1e-2).name]
    assert choose_lr(img, 'reduced', 'mlp', 'soap') is None and len(compare_plan('reduced', img, ['mlp'], ['soap'])) == 3
    full = compare_plan('full', networks=['mlp'], methods=['bp-sgd'])  # the held-out protocol: seed 0 sweeps 5 rates
    assert [(r.lr, r.seed) for r in full] == [(lr, 0) for lr in (0.003, 0.01, 0.03, 0.1, 0.3)]


def test_choose_lr_averages_over_sweep_seeds(monkeypatch):
    # a setting whose sweep runs on 3 seeds (no built-in one does now): the mean over them decides
    monkeypatch.setitem(SETTINGS, 'three', dataclasses.replace(SETTINGS['reduced'], name='three', sweep_seeds=(0, 1, 2)))
    plan = compare_plan('three', networks=['convnet'], methods=['bp-adamw'])
    assert [r.seed for r in plan] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # seed by seed
    recs = {r.name: _fake(r, {3e-4: [0.5, 0.1, 0.1], 1e-3: [0.3, 0.3, 0.3], 3e-3: [0.2, 0.2, 0.2]}[r.lr][r.seed]) for r in plan}
    assert choose_lr(recs, 'three', 'convnet', 'bp-adamw') == 1e-3  # mean 0.3 beats 0.233 although 3e-4 has the best seed
    recs[make_run('three', 'convnet', 'bp-adamw', 1e-3, 1).name]['status'] = 'diverged'
    assert choose_lr(recs, 'three', 'convnet', 'bp-adamw') == 3e-4  # a diverged seed sinks its learning rate


def _ladder(lo, n):
    "n rungs of the 1-3 ladder from lo up, computed independently of ladder_step"
    out, x = [], lo
    for _ in range(n):
        out.append(x)
        m = round(x / 10 ** math.floor(math.log10(x) + 1e-9))
        x = float(f'{3 if m == 1 else 1}e{math.floor(math.log10(x) + 1e-9) + (m == 3)}')
    return out


def _grow(setting, network, method, score, rounds=12):
    "Records from the plan until it stops growing: every run finished, val_acc = score(run)"
    recs = {}
    for _ in range(rounds):
        recs.update({r.name: _fake(r, score(r)) for r in compare_plan(setting, recs, [network], [method]) if r.name not in recs})
    return recs


@pytest.mark.parametrize('peak', [1e-6, 1e-4, 5e-4, 2e-3, 7e-3, 0.05, 0.2, 30.0])
def test_widened_sweep_finds_the_peak_within_reach(peak):
    # SOAP on the MLP: 5 rates 3e-4..3e-2, widened by up to 3 rungs each side: 1e-5..1 in reach
    reach = _ladder(1e-5, 11)
    assert reach[0] == 1e-5 and reach[-1] == 1.0 and reach[3:8] == list(lr_grid('mlp', 'soap', width=5))
    score = lambda r: -abs(math.log(r.lr / peak))  # unimodal in log(lr), best at the peak
    recs = _grow('heldout', 'mlp', 'soap', score)
    s = sweep(recs, 'heldout', 'mlp', 'soap')
    best = max(reach, key=lambda lr: -abs(math.log(lr / peak)))  # the brute-force answer over everything in reach
    assert s.chosen == (best, None)
    assert s.at_edge == (best in (reach[0], reach[-1]))  # chosen at the edge of the widest grid: marked
    swept = [lr for lr, _ in s.rates]
    assert sorted(swept) == swept and set(lr_grid('mlp', 'soap', width=5)) <= set(swept) and len(swept) <= 11
    held = [r for r in compare_plan('heldout', recs, ['mlp'], ['soap']) if r.seed != 0]
    assert [(r.lr, r.seed) for r in held] == [(best, 1), (best, 2), (best, 3)]


def test_a_diverged_rate_beyond_the_edge_ends_the_widening():
    # the larger the better, but 1.0 (the first rung above the grid) diverges: 0.3 is interior
    recs = {}
    for _ in range(4):
        for r in compare_plan('heldout', recs, ['mlp'], ['bp-sgd']):
            if r.name not in recs: recs[r.name] = _fake(r, r.lr, 'diverged' if r.lr >= 1.0 else 'finished')
    s = sweep(recs, 'heldout', 'mlp', 'bp-sgd')
    assert s.chosen == (0.3, None) and not s.at_edge and [lr for lr, _ in s.rates][-1] == 1.0


def test_muon_sweeps_its_adamw_side_rate_at_its_chosen_rate():
    score = lambda r: -abs(math.log(r.lr / 0.03)) - abs(math.log(r.aux_lr / 1e-4))  # AdamW side best at 1e-4
    recs = _grow('heldout', 'mlp', 'muon', score)  # the MLP: the larger the validation accuracy, the better
    s = sweep(recs, 'heldout', 'mlp', 'muon')
    assert s.chosen == (0.03, 1e-4) and not s.at_edge  # 1e-4 is interior once 3e-5 has run
    assert sorted(a for lr, a in s.rates if lr == 0.03) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    assert {a for lr, a in s.rates if lr != 0.03} == {1e-3}  # the first stage runs at MUON_AUX_LR
    held = [r.name for r in compare_plan('heldout', recs, ['mlp'], ['muon']) if r.seed != 0]
    assert held == [f'heldout-mlp-muon-lr0.03-aux0.0001-seed{s}' for s in (1, 2, 3)]
    # the run is trained with that AdamW-side rate
    from proxprop_nb.lab import compare_run
    seen = []
    def spy(model, network, method, lr, aux_lr=None):
        seen.append((method, lr, aux_lr)); return make_method(model, network, method, lr, aux_lr)
    run = dataclasses.replace(make_run('heldout', 'lm', 'muon', 0.03, 1, 1e-4), budget_s=0.05, n_evals=1,
                              sizes=(32, 1, 2, 32), n_eval=8, n_test=8, batch_size=4, text_bytes=50_000)
    import unittest.mock
    with unittest.mock.patch.object(compare_run, 'make_method', spy): r = run_compare(run, device='cpu')
    assert seen == [('muon', 0.03, 1e-4)] and r['run']['aux_lr'] == 1e-4


def test_held_out_seeds_are_reported_and_the_sweep_seed_is_not():
    recs = _grow('heldout', 'mlp', 'bp-sgd', lambda r: 0.5 - abs(math.log(r.lr / 0.1)))
    assert sorted(r['seed'] for r in recs.values() if r['run']['lr'] == 0.1) == [0, 1, 2, 3]
    (lr, runs), = chosen_runs(recs.values()).values()
    assert lr == 0.1 and [r['seed'] for r in runs] == [1, 2, 3]  # seed 0 chose the rate and is not reported
    row, = summarize(recs.values())
    assert (row['seeds'], row['at_edge'], row['aux_lr']) == ([1, 2, 3], False, None)
    reduced = _grow('reduced', 'mlp', 'bp-sgd', lambda r: 0.5 - abs(math.log(r.lr / 0.03)))
    assert [r['seed'] for r in chosen_runs(reduced.values())['reduced', 'mlp', 'bp-sgd'][1]] == [0, 1, 2]  # every seed


# --- the run --------------------------------------------------------------------------------------------------------

def test_run_compare_respects_budget_and_evaluation_points(tmp_path):
    run = dataclasses.replace(make_run('quick', 'convnet', 'exact-adamw', 1e-3), budget_s=0.6, n_evals=3)
    r = run_compare(run, out_dir=tmp_path, device='cpu')
    h = r['history']
    assert r['status'] == 'finished' and r['clock'] == 'process'
    assert h['time'][0] == 0 and h['step'][0] == 0 and h['time'][-1] >= 0.6
    step_s = h['time'][-1] / h['step'][-1]
    assert h['time'][-1] < 0.6 + 10 * step_s + 0.5  # stops at the first step past the budget
    assert 2 <= len(h['time']) <= 4 and all(a < b for a, b in zip(h['time'], h['time'][1:]))
    for i, t in enumerate(h['time'][1:-1], 1): assert t >= 0.6 * i / 3 - 1e-9  # evaluations only after their point
    assert r['prox_layers'] == ['0', '3', '6'] and r['muon_layers'] == []
    assert r['environment']['source_hash'] and r['data']['kind'] == 'synthetic'
    assert r['test_acc'] is not None and r['final']['train_loss'] == h['train_loss'][-1]
    assert load_records(tmp_path) == {run.name: r}


def test_run_compare_diverges_and_skips_and_refuses(tmp_path):
    run = make_run('quick', 'mlp', 'bp-sgd', 1e6)  # far too large a step
    r = run_compare(dataclasses.replace(run, budget_s=2.0), out_dir=tmp_path)
    assert r['status'] == 'diverged' and r['final'] is None and r['test_acc'] is None
    assert run_compare(dataclasses.replace(run, budget_s=2.0), out_dir=tmp_path)['finished'] == r['finished']  # stored: skipped
    write_json(tmp_path / f'{run.name}.json', dict(r, run=dataclasses.replace(run, seed=5).to_dict()))
    with pytest.raises(ValueError, match='belongs to another configuration'): run_compare(run, out_dir=tmp_path)
    late = run_compare(make_run('quick', 'lm', 'bp-sgd', 0.3), deadline=time.time() + estimate_s(run) - 1)
    assert late['status'] == 'not started'
    with pytest.raises(ValueError, match="clock='cpu' is not valid"): run_compare(make_run('quick', 'lm', 'bp-sgd', 0.3), clock='cpu')


def test_run_setting_and_command_line(tmp_path, capsys):
    recs = run_setting('quick', tmp_path, networks=['lm'], methods=['bp-sgd', 'soap'], log=None)
    assert sorted(recs) == sorted(make_run('quick', 'lm', m, lr_grid('lm', m)[1], s).name for m in ('bp-sgd', 'soap') for s in (0, 1))
    assert main(['--setting', 'quick', '--networks', 'lm', '--methods', 'bp-sgd', 'soap', '--out', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'lm (quick setting)' in out and 'SOAP' in out
    assert main(['--setting', 'quick', '--plan', '--networks', 'mlp', '--methods', 'muon', '--out', str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [make_run('quick', 'mlp', 'muon', 0.02).name]
    with pytest.raises(SystemExit): main(['--setting', 'huge'])
    with pytest.raises(SystemExit): main(['--workers', '0'])


# --- summaries ------------------------------------------------------------------------------------------------------

def _rec(method, seed, losses, accs, setting='quick', network='mlp', status='finished', lr=None):
    run = make_run(setting, network, method, lr or lr_grid(network, method)[1], seed)
    h = dict(time=[0.0, 1.0, 2.0][:len(losses)], train_loss=losses, val_acc=accs, val_loss=losses)
    return dict(name=run.name, setting=setting, network=network, method=method, seed=seed, status=status, steps=10 * (seed + 1),
                history=h, final=dict(train_loss=losses[-1], val_acc=accs[-1], val_loss=losses[-1]) if status == 'finished' else None,
                test_acc=accs[-1] if status == 'finished' else None, test_loss=losses[-1])


def test_time_to_target():
    h = dict(time=[0, 2, 4], train_loss=[2.0, None, 1.0], val_acc=[0.1, 0.5, 0.4])
    assert time_to_target(h, 'train_loss', 1.5) == 4  # a missing value never counts
    assert time_to_target(h, 'val_acc', 0.45) == 2 and time_to_target(h, 'val_acc', 0.6) is None
    assert time_to_target(h, 'train_loss', 2.0) == 0


def test_summarize_against_statistics():
    recs = [_rec('bp-adamw', 0, [2.3, 2.0, 1.6], [0.1, 0.2, 0.3]), _rec('bp-adamw', 1, [2.3, 2.0, 2.0], [0.1, 0.2, 0.5]),
            _rec('exact-sgd', 0, [2.3, 1.0, 0.5], [0.1, 0.45, 0.35]), _rec('exact-sgd', 1, [2.3, 1.9, 1.7], [0.1, 0.3, 0.41]),
            _rec('exact-sgd', 1, [2.3, 9.0], [0.1, 0.1], status='diverged', lr=lr_grid('mlp', 'exact-sgd')[0])]
    rows = summarize(recs)
    assert [r['method'] for r in rows] == ['bp-adamw', 'exact-sgd']
    bp, ex = rows
    assert math.isclose(bp['targets']['train_loss'], 1.8) and math.isclose(bp['targets']['val_acc'], 0.4)
    assert ex['seeds'] == [0, 1] and ex['diverged'] == 0  # the diverged run had another learning rate
    m, sd, n = ex['train_loss']
    assert (n, math.isclose(m, statistics.fmean([0.5, 1.7])), math.isclose(sd, statistics.stdev([0.5, 1.7]))) == (2, True, True)
    assert ex['tt_train_loss'] == [1.0, 2.0] and ex['tt_val_acc'] == [1.0, 2.0]
    assert bp['tt_val_acc'] == [None, 2.0]
    assert ex['steps'][0] == 15
    text = format_summary(rows)
    assert 'ProxProp exact + Nesterov SGD' in text and '1.100 ± 0.849' in text and '1.5 s (2/2)' in text and '- (0/2)' not in text
    assert '2.0 s (1/2)' in text  # BackProp + AdamW reaches its own accuracy target with one seed


def test_summary_of_diverged_seed():
    recs = [_rec('bp-adamw', s, [2.3, 2.0, 1.9], [0.1, 0.2, 0.3]) for s in (0, 1)]
    recs += [_rec('cg3-sgd', 0, [2.3, 1.5, 1.0], [0.1, 0.3, 0.4]), _rec('cg3-sgd', 1, [2.3, 50.0], [0.1, 0.1], status='diverged')]
    row = summarize(recs)[1]
    assert row['diverged'] == 1 and row['train_loss'][2] == 1 and row['tt_train_loss'] == [1.0, None]
    assert '1 diverged' in format_summary(summarize(recs))


def test_describe_records_names_machine_data_and_commit(tmp_path):
    run_setting('quick', tmp_path, networks=['lm', 'convnet'], methods=['bp-adamw'], log=None)
    text = describe_records(load_records(tmp_path).values())
    assert 'quick' in text and 'synthetic' in text and 'standard library' in text and 'random synthetic images' in text and 'commit' in text and 'process clock' in text


def test_long_setting_runs_the_heldout_picks_and_refuses_without_them(tmp_path, capsys):
    picks = tmp_path / 'heldout'
    recs = _grow('heldout', 'convnet', 'cg3-adamw', lambda r: 0.5 - abs(math.log(r.lr / 3e-3)))
    recs.update(_grow('heldout', 'convnet', 'muon', lambda r: 0.5 - abs(math.log(r.lr / 0.1)) - abs(math.log(r.aux_lr / 3e-3))))
    for name, r in recs.items(): write_json(picks / f'{name}.json', dict(r, kind='compare'))
    assert compare_plan('long', {}) == []  # nothing to run before the heldout sweep
    plan = compare_plan('long', load_records(picks))
    assert [(r.method, r.lr, r.aux_lr, r.seed, r.budget_s) for r in plan] == [
        (m, lr, aux, seed, 120) for seed in (1, 2, 3) for m, lr, aux in (('muon', 0.1, 3e-3), ('cg3-adamw', 3e-3, None))]
    assert main(['--setting', 'long', '--plan', '--picks', str(picks), '--out', str(tmp_path / 'long')]) == 0
    assert capsys.readouterr().out.split() == [r.name for r in plan]
    with pytest.raises(SystemExit): main(['--setting', 'long', '--picks', str(tmp_path / 'none'), '--out', str(tmp_path / 'x')])
    assert 'holds no heldout records' in capsys.readouterr().err
    with pytest.raises(SystemExit): main(['--setting', 'reduced', '--picks', str(picks), '--plan', '--out', str(tmp_path / 'y')])
    assert '--picks is for a setting' in capsys.readouterr().err
    with pytest.raises(ValueError, match="runs at the rates the 'heldout' sweep chose"):
        run_setting('long', tmp_path / 'long', networks=['convnet'])
    # the report takes the long runs at the heldout choice
    long_recs = {r.name: _fake(r, 0.4) for r in plan}
    chosen = chosen_runs([*long_recs.values(), *recs.values()])
    assert sorted(r['seed'] for r in chosen['long', 'convnet', 'muon'][1]) == [1, 2, 3]
