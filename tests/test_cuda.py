"""ProxProp on a CUDA GPU, every check against a CPU float64 reference. Skipped without CUDA.

Self-contained (no fixtures from conftest), so that the GPU campaign runs it with `pytest --noconftest` on a
machine with torch but without the notebook test tools.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proxprop_nb import ProxPropLinear, ProxPropConv2d, proxprop_module, proxpropify, unproxpropify
from proxprop_nb.solvers import check_prox_args, RouteChooser
from proxprop_nb.layers import route_chooser, ProxPropMixin, ElapsedTime
from proxprop_nb.linear import prox_linear
from proxprop_nb.conv import prox_conv, conv_gram, ConvGeometry
from proxprop_nb.lab.train import mlp, convnet

DEV = os.environ.get('PROXPROP_TEST_DEVICE', 'cuda')  # 'cpu' rehearses these tests on a machine without a GPU
pytestmark = pytest.mark.skipif(DEV == 'cuda' and not torch.cuda.is_available(), reason='needs a CUDA GPU')
f64 = torch.float64


@pytest.fixture(autouse=True)
def full_fp32():
    "No TF32 in float32 matrix products and convolutions: the float32 checks compare IEEE float32"
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


TOL = {f64: 1e-9, torch.float32: 1e-3}


def dense_linear(x, g, bias, tau):
    "Independent reference on the CPU in float64: (A^T A + I/tau)^-1 A^T g with A = [x, 1]"
    x, g = x.double().cpu(), g.double().cpu()
    A = torch.cat([x, torch.ones(len(x), 1, dtype=f64)], 1) if bias else x
    D = torch.linalg.solve(A.T @ A + torch.eye(A.shape[1], dtype=f64) / tau, A.T @ g).T
    return (D[:, :-1], D[:, -1]) if bias else (D, None)


def jacobian_direction(base, x, g, tau):
    "Independent reference for any module linear in its parameters, on the CPU in float64, via the Jacobian"
    base = copy.deepcopy(base).double().cpu()
    x, g = x.double().cpu(), g.double().cpu()
    names, ps = zip(*[(n, p.detach()) for n, p in base.named_parameters()])
    f = lambda *q: torch.func.functional_call(base, dict(zip(names, q)), (x,)).flatten()
    J = torch.cat([j.flatten(1) for j in torch.autograd.functional.jacobian(f, ps, vectorize=True)], 1)
    D = torch.linalg.solve(J.T @ J + torch.eye(J.shape[1], dtype=f64) / tau, J.T @ g.flatten())
    return [d.view(p.shape) for d, p in zip(D.split([p.numel() for p in ps]), ps)]


# ---- every solver route ---------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [f64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('route,mode', [('dual', 'prox_exact'), ('primal', 'prox_exact'), ('dual', 'prox_cg4'),
                                        ('primal', 'prox_cg4'), ('matrix_free', 'prox_cg4')])
@pytest.mark.parametrize('N', [12, 60])
def test_linear_routes(route, mode, N, dtype):
    gen = torch.Generator().manual_seed(N)
    x, g = torch.randn(N, 30, generator=gen, dtype=f64), torch.randn(N, 7, generator=gen, dtype=f64)
    spec = check_prox_args(0.3, mode, cg_tol=0, solver=route)
    W, b, r = prox_linear(x.to(DEV, dtype), g.to(DEV, dtype), True, spec)
    assert r.route == route and W.device.type == torch.device(DEV).type and W.dtype == dtype
    W_ref, b_ref = dense_linear(x, g, True, 0.3) if mode == 'prox_exact' else prox_linear(x, g, True, spec)[:2]
    assert rel(W, W_ref) < TOL[dtype] and rel(b, b_ref) < TOL[dtype]


@pytest.mark.parametrize('route', ['offsets', 'correlation'])
@pytest.mark.parametrize('kw', [dict(padding=2), dict(padding=1, dilation=2), dict(padding=0, groups=2)], ids=str)
def test_conv_gram_routes(route, kw):
    conv = nn.Conv2d(4, 6, 5 if kw.get('dilation', 1) == 1 else 3, **kw)
    x = torch.randn(3, 4, 9, 8, dtype=f64)
    geo = ConvGeometry.of(conv)
    G = conv_gram(x.to(DEV), conv.kernel_size, geo, True, 0.5, route)
    cols = F.unfold(x, conv.kernel_size, kw.get('dilation', 1), kw.get('padding', 0))  # (N, C k^2, L): im2col
    Cg, n = 4 // geo.groups, 4 // geo.groups * conv.kernel_size[0] * conv.kernel_size[1]
    for gi in range(geo.groups):
        A = cols[:, gi * n:(gi + 1) * n].transpose(1, 2).reshape(-1, n)
        A = torch.cat([A, torch.ones(len(A), 1, dtype=f64)], 1)
        assert rel(G[gi], A.T @ A + 0.5 * torch.eye(n + 1, dtype=f64)) < 1e-12


@pytest.mark.parametrize('dtype', [f64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('solver,mode', [('primal', 'prox_exact'), ('primal', 'prox_cg5'), ('matrix_free', 'prox_cg5')])
@pytest.mark.parametrize('kw', [dict(padding=1), dict(stride=2, padding=1), dict(padding=1, groups=2)], ids=str)
def test_conv_routes(solver, mode, kw, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kw).double()
    x = torch.randn(3, 4, 8, 8, dtype=f64)
    g = torch.randn_like(conv(x))
    geo, spec = ConvGeometry.of(conv), check_prox_args(0.4, mode, cg_tol=0, solver=solver)
    gx, W, b, r = prox_conv(x.to(DEV, dtype), g.to(DEV, dtype), conv.weight.detach().to(DEV, dtype), True, geo, spec)
    assert r.route == solver
    if mode == 'prox_exact': W_ref, b_ref = jacobian_direction(conv, x, g, 0.4)
    else: _, W_ref, b_ref, _ = prox_conv(x, g, conv.weight.detach(), True, geo, spec)
    gx_ref = torch.autograd.grad((conv(x.requires_grad_()) * g).sum(), x)[0]
    assert rel(W, W_ref) < TOL[dtype] and rel(b, b_ref) < TOL[dtype] and rel(gx, gx_ref) < TOL[dtype]


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg40'])
def test_transposed_conv_dense_and_matrix_free(mode):
    torch.manual_seed(0)
    layer = proxprop_module(nn.ConvTranspose2d)(2, 3, 3, stride=2, padding=1, optimization_mode=mode, cg_tol=0,
                                                tau_prox=0.6).double()
    x = torch.randn(2, 2, 3, 4, dtype=f64)
    ref_layer = copy.deepcopy(layer)
    g = torch.randn_like(ref_layer(x))
    layer.to(DEV)(x.to(DEV)).backward(g.to(DEV))
    assert layer.last_route == ('dense' if mode == 'prox_exact' else 'matrix_free')
    for p, r in zip(layer.parameters(), jacobian_direction(unproxpropify(nn.Sequential(ref_layer))[0], x, g, 0.6)):
        assert rel(p.grad, r) < 1e-8


class Proj(nn.Module):
    "A generic module linear in its weight"
    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i ** 0.5)

    def forward(self, x): return x @ self.weight


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg30'])
def test_generic_module(mode):
    torch.manual_seed(0)
    layer = proxprop_module(Proj)(6, 3, optimization_mode=mode, cg_tol=0, tau_prox=0.7).double()
    x, g = torch.randn(5, 6, dtype=f64), torch.randn(5, 3, dtype=f64)
    ref = jacobian_direction(unproxpropify(nn.Sequential(copy.deepcopy(layer)))[0], x, g, 0.7)
    layer.to(DEV)(x.to(DEV)).backward(g.to(DEV))
    assert layer.last_route == ('dense' if mode == 'prox_exact' else 'matrix_free')
    assert rel(layer.weight.grad, ref[0]) < 1e-8


# ---- per-device route choice ------------------------------------------------------------------------

def test_measured_route_choice_on_cuda():
    assert route_chooser(DEV).policy == ('measure' if DEV == 'cuda' else 'model')
    gen = torch.Generator().manual_seed(0)
    x, g = torch.rand(64, 65, generator=gen).to(DEV), torch.randn(64, 20, generator=gen).to(DEV)
    spec = check_prox_args(0.5, 'prox_cg3', cg_tol=0)
    W, b, info = prox_linear(x, g, True, spec, RouteChooser('measure', torch.cuda.synchronize if DEV == 'cuda' else lambda: None))
    route = info.route
    assert route in ('dual', 'primal', 'matrix_free')
    W_forced, b_forced, _ = prox_linear(x, g, True, check_prox_args(0.5, 'prox_cg3', cg_tol=0, solver=route))
    assert rel(W, W_forced) < 1e-6 and rel(b, b_forced) < 1e-6


# ---- autocast -----------------------------------------------------------------------------------------

LAYERS = {
    'linear': (lambda **p: ProxPropLinear(12, 5, **p), (7, 12)),
    'conv2d': (lambda **p: ProxPropConv2d(3, 4, 3, padding=1, **p), (2, 3, 6, 6)),
    'convtranspose2d': (lambda **p: proxprop_module(nn.ConvTranspose2d)(2, 3, 3, stride=2, **p), (2, 2, 3, 4)),
    'generic': (lambda **p: proxprop_module(Proj)(6, 3, **p), (5, 6)),
}
AMP_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def amp_step(layer, x, g, dtype=None):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast(DEV, dtype=dtype or torch.float16, enabled=dtype is not None):
        out = layer(x)
    out.backward(g.to(out.dtype))
    return out, x.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_autocast(name, mode, dtype):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make(optimization_mode=mode, tau_prox=0.5, cg_tol=0)
    x = torch.randn(*shape)
    g = torch.randn_like(layer(x))
    ref = copy.deepcopy(layer).double()  # the CPU float64 reference
    _, _, d64 = amp_step(ref, x.double(), g.double())
    layer.to(DEV)
    out, gx, d = amp_step(layer, x.to(DEV), g.to(DEV), dtype)
    base = unproxpropify(nn.Sequential(copy.deepcopy(layer)))[0]
    out_b, gx_b, d_b = amp_step(base, x.to(DEV), g.to(DEV), dtype)
    assert out.dtype == out_b.dtype == dtype and gx.dtype == gx_b.dtype == torch.float32
    assert rel(gx, gx_b) < 1e-3
    assert [q.dtype for q in d] == [torch.float32] * len(d)
    if mode == 'gradient':
        assert max(rel(q, r) for q, r in zip(d, d_b)) < 1e-3
    assert max(rel(q, r) for q, r in zip(d, d64)) < AMP_TOL[dtype]


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg3'])
def test_gradscaler_skips_overflowing_step(mode):
    torch.manual_seed(0)
    model = proxpropify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 16),
                                      nn.ReLU(), nn.Linear(16, 4)), optimization_mode=mode, last_explicit=True).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 6, 6, device=DEV), torch.randint(0, 4, (8,), device=DEV)
    for scale, skipped in ((2.0 ** 60, True), (2.0 ** 8, False)):
        scaler = torch.amp.GradScaler(DEV, init_scale=scale)
        opt.zero_grad()
        with torch.autocast(DEV, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt); scaler.update()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) == skipped


# ---- memory layouts -------------------------------------------------------------------------------------

@pytest.mark.parametrize('solver', ['primal', 'matrix_free'])
def test_channels_last_and_non_contiguous(solver):
    torch.manual_seed(0)
    conv = ProxPropConv2d(4, 5, 3, padding=1, optimization_mode='prox_cg4', cg_tol=0, solver=solver, tau_prox=0.5).double()
    x = torch.randn(3, 4, 7, 7, dtype=f64)
    g = torch.randn(3, 5, 7, 7, dtype=f64)
    ref = copy.deepcopy(conv)
    ref(x).backward(g)
    conv.to(DEV)
    for xx in (x.to(DEV).to(memory_format=torch.channels_last), x.to(DEV).transpose(2, 3).contiguous().transpose(2, 3)):
        cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
        cl.zero_grad()
        cl(xx).backward(g.to(DEV).to(memory_format=torch.channels_last))
        assert rel(cl.weight.grad, ref.weight.grad) < 1e-10 and rel(cl.bias.grad, ref.bias.grad) < 1e-10
    lin = ProxPropLinear(7, 3, optimization_mode='prox_exact', dtype=f64)
    xl = torch.randn(7, 9, dtype=f64)  # x = xl.T is a non-contiguous view
    ref = copy.deepcopy(lin)
    gl = torch.randn(9, 3, dtype=f64)
    ref(xl.T).backward(gl)
    lin.to(DEV)(xl.to(DEV).T).backward(gl.to(DEV))
    assert rel(lin.weight.grad, ref.weight.grad) < 1e-10


# ---- no host synchronisation in CG at cg_tol=0 -----------------------------------------------------------

@pytest.mark.parametrize('cg_tol', [0, 1e-2])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_cg_backward_makes_no_host_sync(model, cg_tol):
    if DEV != 'cuda': pytest.skip("torch.cuda.set_sync_debug_mode needs CUDA (tests/test_compile.py counts syncs on the CPU)")
    torch.manual_seed(0)
    net = (mlp((3072, 256, 128, 256, 10), optimization_mode='prox_cg3', cg_tol=cg_tol) if model == 'mlp'
           else convnet(optimization_mode='prox_cg3', cg_tol=cg_tol)).to(DEV)
    x = torch.randn(100, 3, 32, 32, device=DEV)
    net(x).sum().backward()  # first step: routes measured (synchronising), caches filled
    net(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try: net(x).sum().backward()  # the solve-time events of every layer included
    finally: torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    times = [m.last_solve.seconds for m in net.modules() if isinstance(m, ProxPropMixin)]
    assert times and all(isinstance(t, ElapsedTime) and 0 < float(t) < 10 for t in times)  # read after the step


# ---- a few training steps of the paper's networks ----------------------------------------------------------

def train_steps(net, device, optimizer, steps=3, batch=64):
    net = net.to(device)
    opt = (torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.95, nesterov=True) if optimizer == 'sgd'
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(batch, 3, 32, 32, generator=gen, dtype=f64)
        y = torch.randint(0, 10, (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x.to(device)), y.to(device)).backward()
        opt.step()
    return [p.detach().cpu() for p in net.parameters()]


@pytest.mark.parametrize('mode,variant', [('prox_exact', 'textbook'), ('prox_cg3', 'textbook'), ('prox_cg3', 'official')])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_training_steps_match_cpu_float64(model, mode, variant):
    torch.manual_seed(0)
    prox = dict(optimization_mode=mode, cg_variant=variant, tau_prox=0.05 if model == 'mlp' else 1.0, cg_tol=0)
    net = (mlp(**prox) if model == 'mlp' else convnet(**prox)).double()
    cpu = train_steps(copy.deepcopy(net), 'cpu', 'sgd' if model == 'mlp' else 'adam')
    gpu = train_steps(net, DEV, 'sgd' if model == 'mlp' else 'adam')
    assert max(rel(a, b) for a, b in zip(gpu, cpu)) < 1e-8


# ---- no host synchronisation in an exact step (the sync-free factorization) --------------------------------

@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_exact_backward_makes_no_host_sync(model):
    if DEV != 'cuda': pytest.skip("torch.cuda.set_sync_debug_mode needs CUDA (tests/test_sync_free.py counts reads on the CPU)")
    torch.manual_seed(0)
    net = (mlp((3072, 256, 128, 256, 10), optimization_mode='prox_exact') if model == 'mlp'
           else convnet(optimization_mode='prox_exact')).to(DEV)
    x = torch.randn(100, 3, 32, 32, device=DEV)
    net(x).sum().backward()  # first step: routes measured (synchronising), caches filled
    net(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try: net(x).sum().backward()
    finally: torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(not bool(m.last_solve.failed) for m in net.modules() if isinstance(m, ProxPropMixin)
               and m.last_solve.failed is not None)


# ---- batched runs on the device against the CPU in float64 --------------------------------------------------

@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_batched_runs_match_cpu_float64(model, mode):
    from proxprop_nb.batched import BatchedRuns
    def runs(device):
        nets = []
        for r, tau in enumerate((1.0, 0.1, 0.5)):
            torch.manual_seed(r)
            prox = dict(optimization_mode=mode, tau_prox=tau, cg_tol=0)
            nets.append((mlp((3072, 64, 32, 10), **prox) if model == 'mlp' else convnet(**prox)).double().to(device))
        opts = [torch.optim.SGD(n.parameters(), lr=lr, momentum=0.9, nesterov=True) for n, lr in zip(nets, (0.1, 0.3, 0.05))]
        batch, gen = BatchedRuns(nets, opts), torch.Generator().manual_seed(1)
        for step in range(3):
            x, y = torch.rand(64, 3, 32, 32, generator=gen, dtype=f64), torch.randint(0, 10, (64,), generator=gen)
            batch.train_step(x.to(device), y.to(device), step=step)
        return [p.detach().cpu() for n in nets for p in n.parameters()]
    assert max(rel(a, b) for a, b in zip(runs(DEV), runs('cpu'))) < 1e-8


# ---- a compiled step (torch.compile, CUDA graphs) against the CPU in float64 ----------------------------------

@pytest.mark.parametrize('how', ['default', 'reduce-overhead'])
@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
def test_compiled_steps_match_cpu_float64(mode, how):
    "The benchmark's compiled step (proxprop-bench --compile) trains what the eager CPU step trains"
    if DEV != 'cuda': pytest.skip('Inductor and CUDA graphs: a GPU (the CPU checks use aot_eager: nbs/06_bench)')
    from proxprop_nb.lab.bench import make_step
    torch.manual_seed(0)
    plain = unproxpropify(mlp((3072, 64, 32, 10), optimization_mode='gradient')).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 3, 32, 32, generator=gen, dtype=f64), torch.randint(0, 10, (64,), generator=gen)
    cpu = make_step(plain, mode, 'sgd', x, y, tau_prox=0.5, cg_tol=0)
    gpu = make_step(plain.to(DEV), mode, 'sgd', x.to(DEV), y.to(DEV), tau_prox=0.5, compile=how, cg_tol=0)
    for _ in range(3): cpu(); gpu()
    assert max(rel(a, b) for a, b in zip(gpu.model.parameters(), cpu.model.parameters())) < 1e-8


# ---- the whole step as a CUDA graph (StepGraph) against the CPU in float64 ------------------------------------

def graphed_training(net, device, optimizer, steps=6, batch=48, n=120):
    "Steps of 48, 48 and 24 samples (an epoch's last minibatch is smaller), by StepGraph on `device`"
    from proxprop_nb import StepGraph
    from proxprop_nb.layers import set_sync_free
    net = net.to(device)
    opt = (torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.95, nesterov=True) if optimizer == 'sgd'
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    emulate = torch.device(device).type != 'cuda'  # PROXPROP_TEST_DEVICE=cpu: the same logic, emulated
    before = set_sync_free(True, 'cpu') if emulate else None
    try:
        step = StepGraph(net, opt, warmup=2, emulate=emulate)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(n, 3, 32, 32, generator=gen, dtype=f64), torch.randint(0, 10, (n,), generator=gen)
        for i in range(steps):
            j = i * batch % n
            step(x[j:j + batch].to(device), y[j:j + batch].to(device))
    finally:
        if emulate: set_sync_free(before, 'cpu')
    return [p.detach().cpu() for p in net.parameters()], step


def eager_training(net, device, optimizer, steps=6, batch=48, n=120):
    "The minibatches of `graphed_training` as eager steps on `device`"
    net = net.to(device)
    opt = (torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.95, nesterov=True) if optimizer == 'sgd'
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 3, 32, 32, generator=gen, dtype=f64), torch.randint(0, 10, (n,), generator=gen)
    for i in range(steps):
        j = i * batch % n
        opt.zero_grad(); F.cross_entropy(net(x[j:j + batch].to(device)), y[j:j + batch].to(device)).backward()
        opt.step()
    return [p.detach().cpu() for p in net.parameters()]


@pytest.mark.parametrize('mode,variant', [('prox_exact', 'textbook'), ('prox_cg3', 'textbook'), ('prox_cg3', 'official'),
                                          ('gradient', 'textbook')])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_graphed_steps_match_cpu_float64(model, mode, variant):
    "Captured and replayed on the GPU (eager warmup and last minibatches between) as eager steps on the CPU"
    torch.manual_seed(0)
    prox = dict(optimization_mode=mode, cg_variant=variant, tau_prox=0.05 if model == 'mlp' else 1.0, cg_tol=0)
    net = (mlp(**prox) if model == 'mlp' else convnet(**prox)).double()
    optimizer = 'sgd' if model == 'mlp' else 'adam'
    cpu = eager_training(copy.deepcopy(net), 'cpu', optimizer)
    gpu, step = graphed_training(net, DEV, optimizer)
    assert step.fallback is None and step.counts['replays'] >= 2, step
    assert max(rel(a, b) for a, b in zip(gpu, cpu)) < 1e-8


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg3'])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_a_graphed_step_makes_no_host_sync(model, mode):
    "A replay, the copies of the minibatch into it and of the layers' records out of it: no synchronisation"
    if DEV != 'cuda': pytest.skip('torch.cuda.set_sync_debug_mode needs CUDA (tests/test_graph.py checks reads on the CPU)')
    from proxprop_nb import StepGraph
    torch.manual_seed(0)
    net = (mlp((3072, 256, 128, 256, 10), optimization_mode=mode) if model == 'mlp'
           else convnet(optimization_mode=mode)).to(DEV)
    clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)  # captured with the step
    step = StepGraph(net, torch.optim.Adam(net.parameters(), lr=1e-4), warmup=2, before_step=clip)
    x, y = torch.randn(100, 3, 32, 32, device=DEV), torch.randint(0, 10, (100,), device=DEV)
    for _ in range(3): step(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try: loss = step(x, y)
    finally: torch.cuda.set_sync_debug_mode(0)
    assert step.fallback is None and step.counts['replays'] == 2, step
    assert torch.isfinite(loss).item()


# ---- Gram matrices formed in the forward pass, on a side stream (set_early_gram) ---------------------------

@pytest.mark.parametrize('graphed', [False, True], ids=['eager', 'graphed'])
@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg3'])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_early_grams_match_cpu_float64(model, mode, graphed):
    "Early Gram matrices on the GPU's side stream (from the second step on: the first times the routes)"
    from unittest.mock import patch
    import proxprop_nb.linear as linear_mod
    import proxprop_nb.conv as conv_mod
    from proxprop_nb.layers import set_early_gram
    torch.manual_seed(0)
    prox = dict(optimization_mode=mode, tau_prox=0.05 if model == 'mlp' else 1.0, cg_tol=0)
    net = (mlp(**prox) if model == 'mlp' else convnet(**prox)).double()
    optimizer = 'sgd' if model == 'mlp' else 'adam'
    cpu = eager_training(copy.deepcopy(net), 'cpu', optimizer)
    formed, phase = [], []  # Gram matrices formed in a forward pass
    def spy(f):
        def counted(*a, **k):
            if phase: formed.append(f.__name__)
            return f(*a, **k)
        return counted
    net.register_forward_pre_hook(lambda *a: phase.append(1))
    net.register_forward_hook(lambda *a: phase.clear())
    before = set_early_gram(True, torch.device(DEV).type)
    try:
        with patch.object(linear_mod, 'linear_dual_gram', spy(linear_mod.linear_dual_gram)), \
             patch.object(linear_mod, 'linear_primal_gram', spy(linear_mod.linear_primal_gram)), \
             patch.object(conv_mod, 'conv_gram', spy(conv_mod.conv_gram)):
            if graphed:
                gpu, step = graphed_training(net, DEV, optimizer)
                assert step.fallback is None and step.counts['replays'] >= 2, step
            else: gpu = eager_training(net, DEV, optimizer)
    finally: set_early_gram(before, torch.device(DEV).type)
    assert formed  # in the forward passes from the second step on
    assert max(rel(a, b) for a, b in zip(gpu, cpu)) < 1e-8


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16-autocast'])
@pytest.mark.parametrize('model', ['mlp', 'convnet'])
def test_early_grams_are_used_and_change_nothing_on_the_gpu(model, amp):
    "float32 (and bf16 autocast: the part reads a float32 copy of the input): from the second step on, the\
 backward forms no Gram matrix, and the steps equal those without early Gram matrices on the same device"
    from unittest.mock import patch
    import proxprop_nb.linear as linear_mod
    import proxprop_nb.conv as conv_mod
    from proxprop_nb.layers import set_early_gram
    device_type = torch.device(DEV).type
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen))
               for _ in range(4)]
    out, backward_grams = [], []
    def spy(f):
        def counted(*a, **k):
            backward_grams.append(phase[0] == 'backward'); return f(*a, **k)
        return counted
    phase = [None]
    for enabled in (False, True):
        torch.manual_seed(0)
        net = (mlp((3072, 256, 128, 256, 10), optimization_mode='prox_exact') if model == 'mlp'
               else convnet(optimization_mode='prox_exact')).to(DEV)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        before = set_early_gram(enabled, device_type)
        try:
            with patch.object(linear_mod, 'linear_dual_gram', spy(linear_mod.linear_dual_gram)), \
                 patch.object(linear_mod, 'linear_primal_gram', spy(linear_mod.linear_primal_gram)), \
                 patch.object(conv_mod, 'conv_gram', spy(conv_mod.conv_gram)):
                for i, (x, y) in enumerate(batches):
                    backward_grams.clear()
                    opt.zero_grad(); phase[0] = 'forward'
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                        loss = F.cross_entropy(net(x.to(DEV)), y.to(DEV))
                    phase[0] = 'backward'; loss.backward(); opt.step()
                    if enabled and i > 0: assert backward_grams and not any(backward_grams), (i, backward_grams)
        finally: set_early_gram(before, device_type)
        out.append([p.detach().cpu() for p in net.parameters()])
    assert max(rel(a, b) for a, b in zip(*out)) < 1e-5
