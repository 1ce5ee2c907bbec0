"""Early Gram matrices (`set_early_gram`): a layer that forms its Gram matrix, and an exact step's inverse, in its
forward pass trains exactly as one that forms them in its backward (float64 on the CPU, bit for bit), the part
is used where it was made for the step and ignored where not, and nothing starts where nothing would be used.
tests/test_cuda.py checks the side-stream version on a GPU."""
import contextlib
import warnings
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import proxprop_nb.conv as conv_mod
import proxprop_nb.linear as linear_mod
from proxprop_nb import ProxPropLinear, ProxPropConv2d, StepGraph
from proxprop_nb.layers import set_early_gram, set_sync_free, set_route_choice, _start_early, _new_call

f64 = torch.float64


@contextlib.contextmanager
def early(enabled=True, device_type='cpu'):
    before = set_early_gram(enabled, device_type)
    try: yield
    finally: set_early_gram(before, device_type)


@contextlib.contextmanager
def gram_counts():
    "Count the Gram matrices formed, by phase: the test sets `counts.phase` to 'forward' or 'backward'"
    counts = SimpleNamespace(phase=None, forward=0, backward=0)
    def spy(f):
        def wrapped(*a, **k):
            setattr(counts, counts.phase, getattr(counts, counts.phase) + 1)
            return f(*a, **k)
        return wrapped
    with patch.object(linear_mod, 'linear_dual_gram', spy(linear_mod.linear_dual_gram)), \
         patch.object(linear_mod, 'linear_primal_gram', spy(linear_mod.linear_primal_gram)), \
         patch.object(conv_mod, 'conv_gram', spy(conv_mod.conv_gram)):
        yield counts


def model_of(mode, solver='auto', seed=0, tau=0.5, variant='textbook'):
    "Conv2d (grouped and plain) and Linear layers, all ProxProp, taking `solver` where it is available"
    torch.manual_seed(seed)
    prox = dict(tau_prox=tau, optimization_mode=mode, cg_variant=variant)
    conv_solver = solver if solver in ('primal', 'matrix_free') else 'auto'
    return nn.Sequential(ProxPropConv2d(3, 4, 3, padding=1, solver=conv_solver, **prox), nn.ReLU(),
                         ProxPropConv2d(4, 4, 3, stride=2, groups=2, solver=conv_solver, **prox), nn.ReLU(),
                         nn.Flatten(), ProxPropLinear(16, 10, solver=solver, **prox), nn.ReLU(),
                         ProxPropLinear(10, 3, solver=solver, **prox)).to(f64)


def batches(n=3, batch=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 6, 6, generator=gen, dtype=f64), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(n)]


def train(model, steps, counts=None):
    "SGD with Nesterov momentum; the parameters after the steps, and the routes of the last"
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for x, y in steps:
        opt.zero_grad(set_to_none=True)
        if counts is not None: counts.phase = 'forward'
        loss = F.cross_entropy(model(x), y)
        if counts is not None: counts.phase = 'backward'
        loss.backward(); opt.step()
    return [p.detach().clone() for p in model.parameters()], [m.last_route for m in model if hasattr(m, 'last_route')]


CASES = [('prox_exact', 'auto'), ('prox_exact', 'primal'), ('prox_exact', 'dual'), ('prox_cg3', 'auto'),
         ('prox_cg3', 'primal'), ('prox_cg3', 'dual'), ('prox_cg3', 'matrix_free'), ('gradient', 'auto')]


@pytest.mark.parametrize('mode,solver', CASES)
@pytest.mark.parametrize('sync_free', [False, True])
def test_early_grams_train_as_the_backward_forms_them(mode, solver, sync_free):
    before = set_sync_free(sync_free, 'cpu')
    try:
        reference, routes = train(model_of(mode, solver), batches())
        with early(), gram_counts() as counts:
            got, routes_early = train(model_of(mode, solver), batches(), counts)
    finally: set_sync_free(before, 'cpu')
    for a, b in zip(reference, got): assert torch.equal(a, b)
    assert routes == routes_early
    grams = sum(r in ('dual', 'primal') for r in routes)  # the layers whose route has a Gram matrix
    assert (counts.forward, counts.backward) == (3 * grams, 0), routes


def test_autocast_steps_are_unchanged():
    "bf16 autocast in the forward: the early part is formed in the backward's dtype, with autocast off"
    out = []
    for enabled in (False, True):
        model = model_of('prox_exact', 'auto').float()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with early(enabled), gram_counts() as counts:
            for x, y in batches():
                opt.zero_grad()
                counts.phase = 'forward'
                with torch.autocast('cpu', dtype=torch.bfloat16): loss = F.cross_entropy(model(x.float()), y)
                counts.phase = 'backward'
                loss.backward(); opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    assert counts.forward > 0 and counts.backward == 0  # (of the run with early Gram matrices)
    for a, b in zip(*out): assert torch.equal(a, b)


@pytest.mark.parametrize('reentrant', [False, True])
def test_checkpointed_layers_start_nothing_in_their_recomputation(reentrant):
    "The recomputation runs inside the backward: a part started there would never be used"
    def run(enabled):
        model = model_of('prox_exact', 'auto')
        x, y = batches(1)[0]
        x.requires_grad_()  # (a reentrant checkpoint takes gradients only through inputs that require them)
        with early(enabled), gram_counts() as counts:
            counts.phase = 'forward'
            out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
            counts.phase = 'backward'
            F.cross_entropy(out, y).backward()
        return [p.grad for p in model.parameters()], counts
    (ref, _), (got, counts) = run(False), run(True)
    for a, b in zip(ref, got): assert torch.equal(a, b)
    # non-reentrant: the first forward's parts are used; reentrant: that forward records no graph, and the
    # backward's recomputation starts none, so the steps form their own
    assert (counts.forward, counts.backward) == ((4, 0) if not reentrant else (0, 4)), counts


def test_a_part_made_for_other_settings_is_not_used():
    "A failure read between forward and backward makes the layer host-checked: the sync-free part is dropped"
    before = set_sync_free(True, 'cpu')
    try:
        outs = []
        for enabled in (False, True):
            torch.manual_seed(0)
            layer = ProxPropLinear(6, 3, tau_prox=0.5, optimization_mode='prox_exact', solver='dual').to(f64)
            x = torch.randn(5, 6, dtype=f64)
            with early(enabled), gram_counts() as counts:
                counts.phase = 'forward'; out = layer(x)
                object.__setattr__(layer, '_host_checked', True)
                counts.phase = 'backward'; out.sum().backward()
            outs.append(layer.weight.grad)
        assert torch.equal(*outs) and (counts.forward, counts.backward) == (1, 1)
    finally: set_sync_free(before, 'cpu')


def test_a_measuring_chooser_starts_no_conv_part_before_timing_its_gram():
    "A forced primal route is known, but its patch Gram's route is timed in the first backward, not the forward"
    set_route_choice('measure', 'cpu')
    try:
        model = model_of('prox_exact', 'primal')
        with early(), gram_counts() as counts:
            train(model, batches(1), counts)
            assert counts.forward == 2 and counts.backward > 2  # the Linear layers' only; the convs time theirs
            counts.forward = counts.backward = 0
            train(model, batches(1, seed=2), counts)
            # every layer's in the forward (conv_gram counted twice: it calls itself with the route it picked)
            assert (counts.forward, counts.backward) == (6, 0)
    finally: set_route_choice('model', 'cpu')


def test_nothing_starts_where_nothing_would_use_it():
    model = model_of('prox_exact', 'auto')
    x, _ = batches(1)[0]
    with early(), gram_counts() as counts:
        counts.phase = 'forward'
        with torch.no_grad(): model(x)  # no autograd graph
        model[0].weight.requires_grad_(False); model[5].weight.requires_grad_(False)  # frozen weights
        model[0](x).sum().backward()  # (the bias alone)
        assert model[0].bias.grad is not None
        assert counts.forward == 0
        model(x).sum().backward()  # the two trained layers only
        assert counts.forward == 2


def test_a_layer_called_twice_takes_its_joint_step_unchanged():
    "Its joint step stacks both calls: the first call's part is not for it, and the second starts none"
    def run(enabled):
        torch.manual_seed(0)
        layer = ProxPropLinear(5, 5, tau_prox=0.5, optimization_mode='prox_exact', solver='dual').to(f64)
        x = torch.randn(4, 5, dtype=f64)
        with early(enabled), gram_counts() as counts:
            counts.phase = 'forward'; out = layer(torch.tanh(layer(x)))
            counts.phase = 'backward'; out.sum().backward()
        return layer.weight.grad, counts
    (ref, _), (got, counts) = run(False), run(True)
    assert torch.equal(ref, got)
    assert (counts.forward, counts.backward) == (1, 1)  # the first call's part, unused; the joint step's own


def test_a_measuring_chooser_starts_nothing_before_it_has_timed_the_shape():
    set_route_choice('measure', 'cpu')
    try:
        model = model_of('prox_exact', 'auto')
        with early(), gram_counts() as counts:
            train(model, batches(1), counts)
            first = (counts.forward, counts.backward)
            counts.forward = counts.backward = 0
            train(model, batches(1, seed=2), counts)
        assert first[0] == 0 and first[1] > 0  # the first step times the routes in its backward
        assert counts.forward > 0 and counts.backward == 0
    finally: set_route_choice('model', 'cpu')


def test_a_factorization_that_fails_falls_back_as_before():
    "Host-checked: the early inverse that failed sends the backward to the primal system, as without it"
    def run(enabled):
        torch.manual_seed(0)
        layer = ProxPropLinear(8, 2, tau_prox=1e30, optimization_mode='prox_exact', solver='dual')
        with early(enabled), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the fallback's warning
            layer(torch.ones(5, 8)).sum().backward()  # a rank-one batch: neither Gram matrix factors
        return layer.weight.grad, layer.last_route
    (ref, route), (got, route_early) = run(False), run(True)
    assert route == route_early == 'dual>primal>cg'
    assert torch.equal(ref, got)


def test_graphed_steps_with_early_grams_train_as_eager_steps():
    before = set_sync_free(True, 'cpu')
    try:
        out = []
        for graphed in (False, True):
            model = model_of('prox_exact', 'auto'); opt = torch.optim.SGD(model.parameters(), lr=0.05)
            def eager(x, y):
                opt.zero_grad(set_to_none=True); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
            with early(graphed):
                step = StepGraph(model, opt, warmup=1, emulate=True) if graphed else eager
                for x, y in batches(5): step(x, y)
            out.append([p.detach().clone() for p in model.parameters()])
        assert step.counts == dict(eager=1, captures=1, replays=4) and step.fallback is None
        for a, b in zip(*out): assert torch.equal(a, b)
    finally: set_sync_free(before, 'cpu')


def test_a_data_parallel_call_starts_nothing():
    "A data-parallel step (and a traced or gradient-mode one) has no call token: it takes no early part"
    layer = ProxPropLinear(2, 2, optimization_mode='prox_exact')
    assert _new_call(layer, collectives=object()) is None and _new_call(layer, None) is not None
    ctx = SimpleNamespace(call=None, needs_input_grad=(True, True, True))
    assert _start_early(ctx, torch.ones(2, 2), lambda *a: pytest.fail('started')) is None


def test_bad_settings_are_refused():
    with pytest.raises(TypeError, match="enabled='on': use True or False"): set_early_gram('on')
