"""ProxProp under torch.compile, and the host synchronisations of a step (none in CG at cg_tol=0)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from proxprop_nb import ProxPropLinear, ProxPropConv2d, proxpropify
from proxprop_nb.solvers import check_prox_args, block_cg
from proxprop_nb.linear import prox_linear
from proxprop_nb.conv import prox_conv, ConvGeometry

SYNCS = ('__bool__', 'item', 'tolist', '__float__', '__int__', '__index__', '__len__')


class CountSyncs(TorchFunctionMode):
    "Counts tensor-to-host conversions (on CUDA each one waits for the device)"
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name in SYNCS and args and torch.is_tensor(args[0]) and not isinstance(args[0], nn.Parameter): self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_sync_counter_counts():
    with CountSyncs() as c:
        t = torch.ones(2)
        bool(t.sum() > 0); t.sum().item(); float(t[0])
    assert c.calls == ['__bool__', 'item', '__float__']


@pytest.mark.parametrize('route', ['dual', 'primal', 'matrix_free'])
@pytest.mark.parametrize('variant', ['textbook', 'official'])
def test_linear_cg_makes_no_host_sync_at_zero_tol(route, variant):
    x, g = torch.randn(20, 9), torch.randn(20, 4)
    spec = check_prox_args(0.5, 'prox_cg5', cg_tol=0, cg_variant=variant, solver=route)
    prox_linear(x, g, True, spec)  # route model and caches warmed
    with CountSyncs() as c: prox_linear(x, g, True, spec)
    assert c.calls == []
    spec_tol = check_prox_args(0.5, 'prox_cg5', cg_tol=1e-3, cg_variant=variant, solver=route)
    with CountSyncs() as c: prox_linear(x, g, True, spec_tol)
    assert len(c.calls) >= 1  # early stopping looks at the residual: one check per iteration (the counter works here)


@pytest.mark.parametrize('route', ['primal', 'matrix_free'])
def test_conv_cg_makes_no_host_sync_at_zero_tol(route):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    g = torch.randn(2, 4, 6, 6)
    spec = check_prox_args(0.5, 'prox_cg3', cg_tol=0, solver=route)
    args = (x, g, conv.weight.detach(), True, ConvGeometry.of(conv), spec)
    prox_conv(*args)
    with CountSyncs() as c: prox_conv(*args)
    assert c.calls == []


def test_sync_free_early_stop_reads_nothing_on_the_host():
    "The device-side early stop (the default on CUDA) counts no host read, and gives the host-side stop's result"
    from proxprop_nb.linear import dual_cg
    x, g = torch.randn(30, 12, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    K = x @ x.T
    with CountSyncs() as c:
        dc = dual_cg(K, g, 0.5, 20, tol=0.1, sync_free=True)
        bc = block_cg(lambda P: [P[0] @ (x.T @ x + 0.5 * torch.eye(12, dtype=x.dtype))], [g.T @ x], 20, tol=0.1, sync_free=True)
    assert c.calls == []
    dc1 = dual_cg(K, g, 0.5, 20, tol=0.1)
    bc1 = block_cg(lambda P: [P[0] @ (x.T @ x + 0.5 * torch.eye(12, dtype=x.dtype))], [g.T @ x], 20, tol=0.1)
    assert torch.equal(dc.solution, dc1.solution) and int(dc.iterations) == dc1.iterations < 20
    assert torch.equal(bc.solution[0], bc1.solution[0]) and int(bc.iterations) == bc1.iterations < 20
    assert torch.equal(dc.residual, dc1.residual) and torch.equal(bc.residual, bc1.residual)


def test_layer_backward_makes_no_host_sync_at_zero_tol():
    model = proxpropify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)),
                        optimization_mode='prox_cg3', cg_tol=0)
    x = torch.randn(5, 3, 6, 6)
    model(x).sum().backward()
    with CountSyncs() as c: model(x).sum().backward()
    assert c.calls == []


def small_net(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 16), nn.ReLU(),
                        nn.Linear(16, 10))
    return proxpropify(net, optimization_mode=mode, tau_prox=0.5, cg_tol=0).double()


def train_steps(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
def test_compiled_model_gives_eager_results(mode):
    eager = small_net(mode)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend='aot_eager')
    for a, b in zip(train_steps(eager), train_steps(compiled)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    eager_routes = [m.last_route for m in eager.modules() if hasattr(m, '_prox')]
    compiled_routes = [m.last_route for m in compiled_net.modules() if hasattr(m, '_prox')]
    # a layer run eagerly records its route; one traced into the graph records nothing (a graph holds no records);
    # a 'gradient' layer is its base module, and takes no step to record
    assert all(c is None or c == e for c, e in zip(compiled_routes, eager_routes))
    assert eager_routes == [None] * 3 if mode == 'gradient' else None not in eager_routes


def test_graph_breaks_at_most_one_per_proxprop_layer():
    torch._dynamo.reset()
    net = small_net('prox_cg3')
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    explained = torch._dynamo.explain(net)(x)
    n_prox = sum('_prox' in m.__dict__ for m in net.modules())
    assert n_prox == 3
    # where a layer's step reads the host (the convolution's Python-side route constants, CG's host-side early stop)
    # it runs eagerly: at most one break per layer. Fewer is better, so no lower bound (Dynamo's tracing of such code
    # changes between torch versions)
    assert explained.graph_break_count <= n_prox


def test_settled_linear_cg_layers_compile_into_one_graph():
    "Once the routes are settled, Linear CG at cg_tol=0 reads nothing on the host: Dynamo traces the backward too"
    torch.manual_seed(0)
    net = proxpropify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
                      optimization_mode='prox_cg3', cg_tol=0).double()
    x = torch.randn(10, 12, dtype=torch.float64)
    net(x).sum().backward()
    torch._dynamo.reset()
    assert torch._dynamo.explain(net)(x).graph_break_count == 0
    ref, comp = copy.deepcopy(net), copy.deepcopy(net)
    for m in (ref, comp): m.zero_grad()
    ref(x).sum().backward()
    torch.compile(comp, backend='aot_eager')(x).sum().backward()
    for p, q in zip(ref.parameters(), comp.parameters()): torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
