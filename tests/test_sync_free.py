"""Sync-free steps (the GPU policy) on the CPU: no host read in a training step, the same directions as the
host-checked steps, and a failed factorization detected a step later and handled as on the host."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proxprop_nb import ProxPropLinear, ProxPropConv2d, proxprop_module
from proxprop_nb.layers import set_sync_free
from proxprop_nb.layers import _PENDING
from proxprop_nb.lab.bench import HOST_READ_OP
from proxprop_nb.lab.bench import top_level_ops

f64 = torch.float64


@pytest.fixture
def sync_free_cpu():
    "The GPU's sync-free policy on the CPU for one test"
    before = set_sync_free(True, 'cpu')
    yield
    set_sync_free(before, 'cpu')


class Bilinear0(nn.Module):
    "A module linear in its parameters that is neither Linear nor a convolution: the generic (dense) route"
    def __init__(self, d, out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, d) / d**0.5)
    def forward(self, x): return x @ self.weight.T * 2


def mlp(mode, solver, dtype):
    torch.manual_seed(0)
    prox = dict(tau_prox=0.5, optimization_mode=mode, cg_tol=0.05, solver=solver)
    return nn.Sequential(ProxPropLinear(12, 16, **prox), nn.ReLU(), ProxPropLinear(16, 10, **prox),
                         nn.ReLU(), proxprop_module(Bilinear0)(10, 4, **{**prox, 'solver': 'auto'})).to(dtype)


def convnet(mode, solver, dtype):
    torch.manual_seed(0)
    prox = dict(tau_prox=0.5, optimization_mode=mode, cg_tol=0.05, solver=solver)
    conv_t = proxprop_module(nn.ConvTranspose2d)(4, 3, 3, stride=2, **{**prox, 'solver': 'auto'})
    return nn.Sequential(ProxPropConv2d(3, 4, 3, padding=1, **prox), nn.ReLU(), conv_t, nn.ReLU(),
                         nn.Flatten(), ProxPropLinear(3 * 13 * 13, 4, tau_prox=0.5, optimization_mode=mode,
                                                      cg_tol=0.05)).to(dtype)


CASES = [('mlp', mode, solver) for mode in ('prox_exact', 'prox_cg3') for solver in ('dual', 'primal')]
CASES += [('mlp', 'prox_cg3', 'matrix_free'), ('mlp', 'gradient', 'auto')]
CASES += [('convnet', mode, solver) for mode, solver in
          [('prox_exact', 'auto'), ('prox_cg3', 'primal'), ('prox_cg3', 'matrix_free'), ('gradient', 'auto')]]
CASES += [('mlp', 'prox_cg3_official', 'auto'), ('convnet', 'prox_cg3_official', 'auto')]


def batch(kind, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 12, generator=gen) if kind == 'mlp' else torch.randn(6, 3, 6, 6, generator=gen)
    return x.to(dtype), torch.randint(0, 4, (len(x),), generator=gen)


def make(kind, mode, solver, dtype):
    variant = 'official' if mode.endswith('_official') else 'textbook'
    model = (mlp if kind == 'mlp' else convnet)(mode.removesuffix('_official'), solver, dtype)
    for m in model.modules():
        if hasattr(m, 'cg_variant'): m.cg_variant = variant
    return model


def train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize('kind,mode,solver', CASES)
def test_a_sync_free_step_reads_nothing_on_the_host(sync_free_cpu, kind, mode, solver):
    model = make(kind, mode, solver, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = batch(kind, torch.float32)
    train_step(model, opt, x, y)  # the first step checks the generic module once (a host read)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(model, opt, x, y)
    reads = [e for e in prof.events() if e.name == HOST_READ_OP]
    assert reads == [], f'{len(reads)} host reads in a sync-free step'
    # the host-checked policy does read: the count above is not blind
    if mode == 'prox_exact' or mode.startswith('prox_cg') and solver != 'matrix_free' and kind == 'mlp':
        set_sync_free(False, 'cpu')
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_step(model, opt, x, y)
        assert any(e.name == HOST_READ_OP for e in prof.events())


@pytest.mark.parametrize('kind,mode,solver', CASES)
def test_sync_free_directions_equal_the_host_checked_ones(kind, mode, solver):
    "float64: the same directions, through three steps, with and without host reads"
    x, y = batch(kind, f64)
    params = []
    for enabled in (False, True):
        before = set_sync_free(enabled, 'cpu')
        try:
            model = make(kind, mode, solver, f64)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            for _ in range(3): train_step(model, opt, x, y)
            routes = [m.last_route for m in model.modules() if hasattr(m, 'last_route')]
        finally: set_sync_free(before, 'cpu')
        params.append([p.detach().clone() for p in model.parameters()])
    # no fallback either way; 'gradient' layers are their base modules and record nothing
    assert all(r is None for r in routes) if mode == 'gradient' else not any('>' in r for r in routes)
    for a, b in zip(*params): torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def singular_layer():
    "A float32 Linear layer whose dual system K + I/tau_prox is singular to working precision"
    torch.manual_seed(0)
    return ProxPropLinear(3, 2, tau_prox=1e30, optimization_mode='prox_exact', solver='dual')


def test_a_failed_factorization_is_read_a_step_later_and_handled_as_on_the_host(sync_free_cpu):
    layer = singular_layer()
    x, g = torch.randn(40, 3), torch.randn(40, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing is read, nothing is said in the failing step
        layer(x).backward(g)
    assert layer.last_solve.route == 'dual' and bool(layer.last_solve.failed)
    assert all((p.grad == 0).all() for p in layer.parameters())  # a zero direction: the step moves nothing
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))
    layer.zero_grad()
    with pytest.warns(RuntimeWarning, match='factorization failed on the device'):
        layer(x).backward(g)  # the flag is read now: this step and later ones check on the host
    assert layer.last_solve.failed is None  # checked on the host now
    twin = singular_layer()  # the host-checked policy's step from the start
    set_sync_free(False, 'cpu')
    twin(x).backward(g)
    assert twin.last_route == layer.last_route
    for p, q in zip(layer.parameters(), twin.parameters()): assert torch.equal(p.grad, q.grad)
    assert layer not in _PENDING or not _PENDING[layer]


def test_a_diverged_run_gives_nan_not_a_failure(sync_free_cpu):
    layer = ProxPropLinear(3, 2, optimization_mode='prox_exact', solver='dual')
    x = torch.randn(5, 3); x[0, 0] = float('nan')
    layer(x).backward(torch.ones(5, 2))
    assert layer.weight.grad.isnan().all() and not bool(layer.last_solve.failed)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer(torch.randn(5, 3)).backward(torch.ones(5, 2))  # no warning: nothing failed
    assert not layer.__dict__.get('_host_checked', False)


def test_a_layer_with_pending_flags_copies_and_pickles():
    layer = singular_layer()
    before = set_sync_free(True, 'cpu')
    try: layer(torch.randn(40, 3)).backward(torch.randn(40, 2))
    finally: set_sync_free(before, 'cpu')
    assert _PENDING[layer]
    twin = copy.deepcopy(layer)  # the flags live outside the layer
    assert twin not in _PENDING


@pytest.mark.parametrize('variant, most', [('textbook', 19), ('official', 21)])
def test_a_sync_free_cg_iteration_stays_within_its_operator_count(variant, most):
    # what one more iteration of batch-space CG costs in operators, with the device-side early stop: the count
    # after fusing the step length, the residual and direction updates (textbook: 32, then 27 before)
    from proxprop_nb.linear import dual_cg
    torch.manual_seed(0)
    A, g = torch.randn(20, 30, dtype=f64), torch.randn(20, 5, dtype=f64)
    K = A @ A.T
    ops = [top_level_ops(lambda: dual_cg(K, g, 0.5, n, tol=1e-30, variant=variant, sync_free=True)) for n in (3, 4)]
    assert 0 < ops[1] - ops[0] <= most, ops


@pytest.mark.parametrize('tensors, most', [(1, 19), (2, 24)])
def test_a_sync_free_block_cg_iteration_stays_within_its_operator_count(tensors, most):
    "Block CG on a weight (and a bias): one operator per update for all tensors (41 for both, host-checked, before)"
    from proxprop_nb.solvers import block_cg
    torch.manual_seed(0)
    A = torch.randn(20, 30, dtype=f64)
    G, rhs = A.T @ A + torch.eye(30, dtype=f64), [torch.randn(5, 30, dtype=f64), torch.randn(5, dtype=f64)]
    apply_M = lambda P: [P[0] @ G] + [2 * p for p in P[1:]]
    ops = [top_level_ops(lambda: block_cg(apply_M, rhs[:tensors], n, tol=1e-30, sync_free=True)) for n in (3, 4)]
    assert 0 < ops[1] - ops[0] <= most, ops
