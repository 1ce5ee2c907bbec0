"""Batched runs against the same runs trained alone: float64 on the CPU, to 1e-10, over several steps."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proxprop_nb.batched import BatchedRuns
from proxprop_nb.lab.models import mlp, convnet, make_optimizer

f64 = torch.float64
MODES = [('gradient', 'textbook'), ('prox_exact', 'textbook'), ('prox_cg3', 'textbook'),
         ('prox_cg3', 'official')]


def small_mlp(**prox): return mlp((48, 20, 12, 10), **prox)
def small_convnet(**prox): return convnet('official', (3, 4, 5, 3), kernel_size=3, img_size=8, **prox)


def build(make, settings, mode, variant):
    "The runs' models: run r seeded r, with its tau_prox"
    models = []
    for r, s in enumerate(settings):
        torch.manual_seed(100 + r)
        prox = dict(tau_prox=s['tau'], optimization_mode=mode, cg_variant=variant, cg_tol=0.05)
        models.append(make(**prox).to(f64))
    return models


def optimizer(model, s): return make_optimizer(model.parameters(), s['opt'], s['lr'], s.get('momentum', 0.95))


def data(make, R, steps, per_run):
    gen = torch.Generator().manual_seed(7)
    shape = (3, 4, 4) if make is small_mlp else (3, 8, 8)
    lead = (steps, R) if per_run else (steps,)
    x = torch.randn(*lead, 16, *shape, generator=gen, dtype=f64)
    return x, torch.randint(0, 10, (*lead, 16), generator=gen)


def alone(make, settings, mode, variant, xs, ys, per_run):
    "Each run trained by itself as train_epoch does: stop (frozen) at the first non-finite loss"
    out = []
    for r, (m, s) in enumerate(zip(build(make, settings, mode, variant), settings)):
        opt = optimizer(m, s)
        for t in range(len(xs)):
            x, y = (xs[t, r], ys[t, r]) if per_run else (xs[t], ys[t])
            loss = F.cross_entropy(m(x), y)
            if not math.isfinite(loss.item()): break
            opt.zero_grad(); loss.backward(); opt.step()
        out.append(m)
    return out


def batched(make, settings, mode, variant, xs, ys, per_run):
    models = build(make, settings, mode, variant)
    b = BatchedRuns(models, [optimizer(m, s) for m, s in zip(models, settings)])
    losses = [b.train_step(xs[t], ys[t], per_run=per_run, step=t) for t in range(len(xs))]
    return models, b, losses


SETTINGS = {'sgd': [dict(opt='sgd', lr=0.05, tau=1.0), dict(opt='sgd', lr=0.2, tau=0.05, momentum=0.5),
                    dict(opt='sgd', lr=0.01, tau=5.0)],
            'adam': [dict(opt='adam', lr=1e-3, tau=1.0), dict(opt='adam', lr=3e-3, tau=0.1)]}


@pytest.mark.parametrize('make', [small_mlp, small_convnet], ids=['mlp', 'convnet'])
@pytest.mark.parametrize('opt', ['sgd', 'adam'])
@pytest.mark.parametrize('mode,variant', MODES)
def test_batched_runs_equal_the_runs_alone(make, opt, mode, variant):
    settings = SETTINGS[opt]
    xs, ys = data(make, len(settings), 4, per_run=False)
    ref = alone(make, settings, mode, variant, xs, ys, False)
    models, b, _ = batched(make, settings, mode, variant, xs, ys, False)
    assert b.diverged == {}
    for a, m in zip(ref, models):
        for p, q in zip(a.parameters(), m.parameters()): torch.testing.assert_close(q, p, rtol=0, atol=1e-10)
    # each run's layers recorded their own steps
    if mode != 'gradient':
        assert all(l.last_solve is not None for m in models for l in m.modules() if hasattr(l, 'last_solve'))


@pytest.mark.parametrize('make', [small_mlp, small_convnet], ids=['mlp', 'convnet'])
def test_each_run_its_own_minibatch_order(make):
    settings = SETTINGS['sgd']
    xs, ys = data(make, len(settings), 3, per_run=True)
    ref = alone(make, settings, 'prox_cg3', 'textbook', xs, ys, True)
    models, _, _ = batched(make, settings, 'prox_cg3', 'textbook', xs, ys, True)
    for a, m in zip(ref, models):
        for p, q in zip(a.parameters(), m.parameters()): torch.testing.assert_close(q, p, rtol=0, atol=1e-10)


@pytest.mark.parametrize('make', [small_mlp, small_convnet], ids=['mlp', 'convnet'])
@pytest.mark.parametrize('mode', ['gradient', 'prox_exact'])
def test_a_diverging_run_is_frozen_and_the_others_go_on_as_alone(make, mode):
    settings = [dict(opt='sgd', lr=0.05, tau=1.0), dict(opt='sgd', lr=1e150, tau=1.0),
                dict(opt='sgd', lr=0.1, tau=0.5)]
    xs, ys = data(make, 3, 6, per_run=False)
    ref = alone(make, settings, mode, 'textbook', xs, ys, False)
    models, b, losses = batched(make, settings, mode, 'textbook', xs, ys, False)
    assert set(b.diverged) == {1} and b.live == [0, 2]
    step, loss = b.diverged[1]
    assert not math.isfinite(loss) and all(math.isnan(l[1]) for l in losses[step + 1:])
    assert all(math.isfinite(l[r]) for l in losses for r in (0, 2))
    for a, m in zip(ref, models):  # the diverged run too: frozen where it stopped alone
        for p, q in zip(a.parameters(), m.parameters()): torch.testing.assert_close(q, p, rtol=0, atol=1e-10)


def test_float32_batched_runs_stay_close_to_alone():
    settings = SETTINGS['sgd']
    xs, ys = data(small_mlp, 3, 3, per_run=False)
    xs = xs.float()
    ref = [m.float() for m in build(small_mlp, settings, 'prox_exact', 'textbook')]
    for m, s in zip(ref, settings):
        opt = optimizer(m, s)
        for t in range(3):
            opt.zero_grad(); F.cross_entropy(m(xs[t]), ys[t]).backward(); opt.step()
    models = [m.float() for m in build(small_mlp, settings, 'prox_exact', 'textbook')]
    b = BatchedRuns(models, [optimizer(m, s) for m, s in zip(models, settings)])
    for t in range(3): b.train_step(xs[t], ys[t])
    for a, m in zip(ref, models):
        for p, q in zip(a.parameters(), m.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_bad_batches_are_refused_in_words():
    with pytest.raises(ValueError, match='2 optimizers for 1 models'):
        m = small_mlp()
        BatchedRuns([m], [optimizer(m, SETTINGS['sgd'][0])] * 2)
    with pytest.raises(ValueError, match='a training step needs the optimizers'):
        BatchedRuns([small_mlp()]).train_step(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match='only convolutions with groups=1'):
        BatchedRuns([nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))])
    with pytest.raises(ValueError, match='per_run input has 2 inputs for 3 runs'):
        BatchedRuns([small_mlp() for _ in range(3)])(torch.zeros(2, 5, 3, 4, 4), per_run=True)
    with pytest.raises(TypeError, match='nn.Sequential'):
        BatchedRuns([nn.Linear(2, 2)])
