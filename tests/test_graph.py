"""StepGraph on the CPU, in emulation: every route and layer kind trains as the eager step trains (float64, bit
for bit), settings that a graph bakes in are captured again, and what a graph cannot hold falls back in words.
tests/test_cuda.py checks the real capture on a GPU."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proxprop_nb import ProxPropLinear, ProxPropConv2d, proxprop_module, StepGraph
from proxprop_nb.graph import CaptureError
from proxprop_nb.layers import set_sync_free, SolveStats, _PENDING

f64 = torch.float64


@pytest.fixture(autouse=True)
def sync_free_cpu():
    "The GPU's sync-free policy on the CPU: what a captured step needs"
    before = set_sync_free(True, 'cpu')
    yield
    set_sync_free(before, 'cpu')


def convnet(mode, variant='textbook', seed=0):
    "Conv2d, a generic module (ConvTranspose2d) and Linear, all ProxProp"
    torch.manual_seed(seed)
    prox = dict(tau_prox=0.5, optimization_mode=mode, cg_variant=variant)
    return nn.Sequential(ProxPropConv2d(3, 4, 3, padding=1, **prox), nn.ReLU(),
                         proxprop_module(nn.ConvTranspose2d)(4, 3, 3, stride=2, **prox), nn.ReLU(),
                         nn.Flatten(), ProxPropLinear(3 * 13 * 13, 4, **prox)).to(f64)


def data(n=30, batch=8):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 6, 6, generator=gen, dtype=f64), torch.randint(0, 4, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for _ in range(2) for i in range(0, n, batch)]


def eager(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
    return loss.detach()


def sgd(model): return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
def adamw(model): return torch.optim.AdamW(model.parameters(), lr=1e-3)


def no_seconds(summary):
    return {k: {f: v for f, v in row.items() if 'seconds' not in f} for k, row in summary.items()}


@pytest.mark.parametrize('mode,variant', [('prox_exact', 'textbook'), ('prox_cg3', 'textbook'),
                                          ('prox_cg3', 'official'), ('gradient', 'textbook')])
@pytest.mark.parametrize('make_opt', [sgd, adamw])
def test_graphed_training_equals_eager_training(mode, variant, make_opt):
    "Every layer kind and route, each epoch ending on a smaller minibatch: the same parameters, losses, records"
    out = []
    for graphed in (False, True):
        model = convnet(mode, variant); opt = make_opt(model)
        step = StepGraph(model, opt, warmup=2, emulate=True) if graphed else (lambda x, y: eager(model, opt, x, y))
        stats = SolveStats(model)
        losses = []
        for x, y in data(): losses.append(step(x, y)); stats.add()
        out.append(([p.detach().clone() for p in model.parameters()], torch.stack(losses), stats.summary()))
    (p0, l0, s0), (p1, l1, s1) = out
    # 2 warmup steps, the capture on the third (its shapes seen twice in a row), and each epoch's last 6 eagerly
    assert step.counts == dict(eager=4, captures=1, replays=4) and step.fallback is None
    for a, b in zip(p0, p1): assert torch.equal(a, b)
    assert torch.equal(l0, l1)
    assert no_seconds(s0) == no_seconds(s1)


# (the dense route of a generic module: the ConvTranspose2d above)
ROUTES = [(kind, solver, mode) for kind in ('linear', 'conv') for solver in ('dual', 'primal', 'matrix_free')
          for mode in ('prox_exact', 'prox_cg3')
          if not (kind == 'conv' and solver == 'dual') and not (solver == 'matrix_free' and mode == 'prox_exact')]


def routed(kind, solver, mode):
    "A small model whose ProxProp layers take the route `solver`"
    torch.manual_seed(0)
    prox = dict(tau_prox=0.5, optimization_mode=mode, solver=solver)
    if kind == 'linear':
        return nn.Sequential(nn.Flatten(), ProxPropLinear(108, 16, **prox), nn.ReLU(),
                             ProxPropLinear(16, 4, **prox)).to(f64)
    return nn.Sequential(ProxPropConv2d(3, 4, 3, padding=1, **prox), nn.ReLU(), nn.Flatten(),
                         nn.Linear(144, 4)).to(f64)


@pytest.mark.parametrize('kind,solver,mode', ROUTES)
def test_every_route_trains_graphed_as_eager(kind, solver, mode):
    out = []
    for graphed in (False, True):
        model = routed(kind, solver, mode); opt = sgd(model)
        step = StepGraph(model, opt, warmup=1, emulate=True) if graphed else (lambda x, y: eager(model, opt, x, y))
        for x, y in data(): step(x, y)
        out.append([p.detach().clone() for p in model.parameters()])
    assert step.counts == dict(eager=3, captures=1, replays=5) and step.fallback is None
    assert all(m.last_route == solver for m in model.modules() if hasattr(m, 'last_route'))
    for a, b in zip(*out): assert torch.equal(a, b)


def test_each_replay_leaves_a_record_of_its_own():
    model = convnet('prox_cg3'); opt = sgd(model)
    step = StepGraph(model, opt, warmup=1, emulate=True)
    batches = data(n=24)
    step(*batches[0]); step(*batches[1])
    first = model[0].last_solve
    kept = {k: v.clone() for k, v in vars(first).items() if torch.is_tensor(v)}
    step(*batches[2])
    assert model[0].last_solve is not first and first.seconds is None
    for k, v in kept.items(): assert torch.equal(getattr(first, k), v)  # the next replay did not overwrite it


def test_a_changed_setting_is_captured_again():
    "lr, momentum, tau_prox, the mode, and train/eval mode: each change is a new capture, trained as eager"
    models = [convnet('prox_cg3'), convnet('prox_cg3')]
    opts = [sgd(m) for m in models]
    step = StepGraph(models[1], opts[1], warmup=1, emulate=True)
    changes = [lambda m, o: o.param_groups[0].update(lr=0.01), lambda m, o: o.param_groups[0].update(momentum=0.5),
               lambda m, o: setattr(m[0], 'tau_prox', 0.1), lambda m, o: setattr(m[5], 'optimization_mode', 'prox_cg2'),
               lambda m, o: m.eval()]
    batches = [b for b in data(n=24)] * 2
    for i, (x, y) in enumerate(batches[:2 + 2 * len(changes)]):
        if i >= 2 and i % 2 == 0:
            for m, o in zip(models, opts): changes[i // 2 - 1](m, o)
        eager(models[0], opts[0], x, y); step(x, y)
    # after each change one eager step (a new setting), then the capture
    assert step.counts == dict(eager=1 + len(changes), captures=1 + len(changes), replays=1 + len(changes))
    for a, b in zip(*[m.parameters() for m in models]): assert torch.equal(a, b)


def test_autocast_bf16_trains_as_the_eager_autocast_step():
    out = []
    for graphed in (False, True):
        model = convnet('prox_cg3'); model.float(); opt = sgd(model)
        step = StepGraph(model, opt, warmup=1, autocast=torch.bfloat16, emulate=True)
        for x, y in data():
            if graphed: step(x.float(), y)
            else:
                opt.zero_grad(set_to_none=True)
                with torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=False):
                    loss = F.cross_entropy(model(x.float()), y)
                loss.backward(); opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    assert step.counts['replays'] == 5
    for a, b in zip(*out): assert torch.equal(a, b)


def test_a_factorization_failing_in_a_replay_makes_the_steps_eager_with_warnings():
    torch.manual_seed(0)
    layer = ProxPropLinear(3, 2, tau_prox=1e30, optimization_mode='prox_exact', solver='dual')
    model, gen = nn.Sequential(layer), torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = StepGraph(model, opt, loss_fn=lambda out, g: (out * g).sum(), warmup=1, emulate=True)
    x, g = torch.randn(3, 3, generator=gen), torch.randn(3, 2, generator=gen)  # K = x x^T + 1 1^T: regular
    step(x, g); step(x, g)  # warmup, then the capture and its replay
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing is said in the failing step: its flag is read at the next
        step(torch.zeros(3, 3), g)  # K = 1 1^T: its Cholesky factorization fails (float32, tau_prox 1e30)
    assert step.counts == dict(eager=1, captures=1, replays=2) and bool(layer.last_solve.failed)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # a zero direction
    with pytest.warns(RuntimeWarning) as caught:
        step(x, g)
    said = [str(w.message) for w in caught]
    assert any('factorization failed on the device' in s for s in said)
    assert any('StepGraph' in s and 'checks each factorization on the host' in s for s in said)
    assert step.graph is None and step.counts['eager'] == 2 and layer.last_solve.failed is None
    assert layer not in _PENDING or not _PENDING[layer]


class Branchy(nn.Module):
    "A module whose Python decides on the data: a graph would replay the capture's branch"
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(4, 2, dtype=f64); self.calls = 0
    def forward(self, x):
        self.calls += 1
        return self.lin(x) if self.calls % 2 else self.lin(x).relu()


def test_emulation_refuses_a_step_whose_python_depends_on_the_data():
    model = Branchy(); step = StepGraph(model, sgd(model), warmup=1, emulate=True)
    x, y = torch.randn(5, 4, dtype=f64), torch.tensor([0, 1, 0, 1, 1])
    step(x, y)
    with pytest.raises(CaptureError, match='other operators than the capture'): step(x, y)


def test_a_step_that_reads_the_host_is_not_captured_and_says_why():
    model = convnet('prox_cg3'); step = StepGraph(model, sgd(model), warmup=1, emulate=True)
    set_sync_free(False, 'cpu')  # CG's stopping test read on the host
    with pytest.warns(RuntimeWarning, match='could not be captured.*reads a device value on the host'):
        for x, y in data()[:3]: step(x, y)
    assert step.counts == dict(eager=3, captures=0, replays=0) and 'reads a device value' in repr(step)


def test_bad_arguments_are_refused_with_what_is_allowed():
    model = convnet('prox_cg3')
    with pytest.raises(ValueError, match="warmup=0: use an int >= 1"): StepGraph(model, sgd(model), warmup=0)
    with pytest.raises(ValueError, match="warmup=True: use an int"): StepGraph(model, sgd(model), warmup=True)
    with pytest.raises(ValueError, match="parameters are on cpu: move the model to a CUDA device"):
        StepGraph(model, sgd(model))
    with pytest.raises(TypeError, match="autocast='bf16': use a torch.dtype"):
        StepGraph(model, sgd(model), autocast='bf16', emulate=True)
    with pytest.raises(TypeError, match="a torch.nn.Module with parameters"):
        StepGraph(nn.ReLU(), None, emulate=True)


class HostCountingSGD(torch.optim.SGD):
    "SGD whose step size decays with a step count kept on the host, in its param_groups (as some optimizers do)"
    def step(self, closure=None):
        for g in self.param_groups:
            g['step'] = g.get('step', 0) + 1
            g['lr'] = 0.1 / g['step']
        return super().step(closure)


def test_settings_that_change_every_step_are_not_frozen_into_a_graph():
    "A learning-rate schedule or an optimizer counting on the host: eager steps, and a warning that says why"
    out = []
    for graphed in (False, True):
        model = convnet('prox_cg3'); opt = HostCountingSGD(model.parameters(), lr=0.1)
        step = StepGraph(model, opt, warmup=1, emulate=True) if graphed else (lambda x, y: eager(model, opt, x, y))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            for x, y in data(n=48): step(x, y)
        out.append([p.detach().clone() for p in model.parameters()])
    assert step.counts == dict(eager=12, captures=0, replays=0)
    assert len(caught) == 1 and 'changed at each of 3 steps in a row' in str(caught[0].message)
    for a, b in zip(*out): assert torch.equal(a, b)


def test_gradient_clipping_before_the_step_is_captured_with_it():
    clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)  # small: every step is clipped
    out = []
    for graphed in (False, True):
        model = convnet('prox_cg3'); opt = sgd(model)
        if graphed: step = StepGraph(model, opt, warmup=1, before_step=clip, emulate=True)
        for x, y in data():
            if graphed: step(x, y)
            else:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward(); clip(model); opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    assert step.counts['replays'] == 5 and step.fallback is None
    for a, b in zip(*out): assert torch.equal(a, b)
    with pytest.raises(TypeError, match="before_step=1: use a function of the model"):
        StepGraph(model, opt, before_step=1, emulate=True)


def test_a_lasting_new_shape_is_captured_again():
    "An epoch's smaller last minibatch is eager; a batch size that stays changed gets a graph of its own"
    model = convnet('prox_cg3'); step = StepGraph(model, sgd(model), warmup=1, emulate=True)
    x, y = data(n=16)[0]
    for n in (8, 8, 8, 5, 8, 5, 5, 5):
        step(x[:n], y[:n])
    # 8: eager, captured, replayed; 5: eager; 8: replayed; 5: eager, then captured for 5, replayed
    assert step.counts == dict(eager=3, captures=2, replays=5)


def test_new_optimizer_state_is_captured_again():
    "load_state_dict gives the optimizer new tensors: the graph would write to the old ones, so it is captured anew"
    out = []
    for graphed in (False, True):
        model = convnet('prox_cg3'); opt = sgd(model)
        step = StepGraph(model, opt, warmup=1, emulate=True) if graphed else (lambda x, y: eager(model, opt, x, y))
        batches = data(n=32)
        for i, (x, y) in enumerate(batches):
            if i == 4: opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a resume: new tensors
            step(x, y)
        out.append([p.detach().clone() for p in model.parameters()])
    assert step.counts == dict(eager=1, captures=2, replays=7)
    for a, b in zip(*out): assert torch.equal(a, b)


def test_changes_now_and_then_do_not_turn_the_graph_off():
    "Only settings that change at every step make the steps eager for good"
    model = convnet('prox_cg3'); opt = sgd(model)
    step = StepGraph(model, opt, warmup=1, emulate=True)
    for i, (x, y) in enumerate(data(n=32) * 2):
        if i % 3 == 0: opt.param_groups[0]['lr'] *= 0.9  # every third step: eager once, then captured again
        step(x, y)
    assert step.fallback is None and step.counts['captures'] >= 4
