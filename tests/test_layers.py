"""ProxProp layers against independent computations: dense float64 solves, autograd, the paper's propositions."""
import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st, HealthCheck

from proxprop_nb import ProxPropLinear, ProxPropConv2d, proxprop_module, proxpropify, unproxpropify
from proxprop_nb.solvers import check_prox_args
from proxprop_nb.linear import prox_linear
from proxprop_nb.conv import prox_conv, ConvGeometry

f64 = torch.float64


def dense_direction(x, g, bias, tau_prox):
    "Solve (A^T A + I/tau) D^T = A^T g densely in float64 with A = [x, 1]"
    x, g = x.reshape(-1, x.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()
    A = torch.cat([x, torch.ones(len(x), 1, dtype=f64)], 1) if bias else x
    return torch.linalg.solve(A.T @ A + torch.eye(A.shape[1], dtype=f64) / tau_prox, A.T @ g).T


def jacobian_direction(layer, x, g, tau_prox):
    "Independent reference for any layer: solve (J^T J + I/tau) D = J^T g with J the Jacobian of the plain module in its parameters"
    base = unproxpropify(nn.Sequential(copy.deepcopy(layer)))[0]
    names, ps = zip(*[(n, p.detach()) for n, p in base.named_parameters()])
    J = torch.cat([j.flatten(1) for j in torch.autograd.functional.jacobian(
        lambda *q: torch.func.functional_call(base, dict(zip(names, q)), (x,)).flatten(), ps)], 1)
    return torch.linalg.solve(J.T @ J + torch.eye(J.shape[1], dtype=J.dtype) / tau_prox, J.T @ g.flatten()), J


def flat_grads(layer):
    return torch.cat([p.grad.reshape(-1) for p in layer.parameters()])


def backward_with(layer, x, g):
    layer.zero_grad()
    layer(x).backward(g)
    return flat_grads(layer)


def true_gradient(layer, x, g):
    "The plain gradient of <layer(x), g>, computed by autograd through the base module"
    base = unproxpropify(nn.Sequential(copy.deepcopy(layer)))[0]
    return torch.cat([q.reshape(-1) for q in torch.autograd.grad((base(x) * g).sum(), list(base.parameters()))])


# ---- Prop. 5: every CG direction is a descent direction ------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 12), d=st.integers(1, 9), out=st.integers(1, 4), n_iter=st.integers(1, 12),
       log_tau=st.floats(-3, 3), bias=st.booleans(), route=st.sampled_from(['dual', 'primal', 'matrix_free']),
       variant=st.sampled_from(['textbook', 'official']), seed=st.integers(0, 10**6))
def test_cg_direction_is_descent_linear(N, d, out, n_iter, log_tau, bias, route, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    x, g = torch.randn(N, d, generator=gen, dtype=f64), torch.randn(N, out, generator=gen, dtype=f64)
    spec = check_prox_args(10 ** log_tau, f'prox_cg{n_iter}', cg_tol=0, cg_variant=variant, solver=route)
    W, b, _ = prox_linear(x, g, bias, spec)
    A = torch.cat([x, torch.ones(N, 1, dtype=f64)], 1) if bias else x
    grad = (g.T @ A).reshape(-1)
    D = torch.cat([W, b[:, None]], 1).reshape(-1) if bias else W.reshape(-1)
    assert D @ grad > 0  # <direction, gradient> > 0: -D is a descent direction
    assert (D @ grad) >= 1e-9 * D.norm() * grad.norm()  # and not numerically orthogonal


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(C=st.integers(1, 3), M=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 1),
       n_iter=st.integers(1, 8), log_tau=st.floats(-2, 2), route=st.sampled_from(['primal', 'matrix_free']), seed=st.integers(0, 10**6))
def test_cg_direction_is_descent_conv(C, M, k, stride, pad, n_iter, log_tau, route, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(C, M, k, stride, pad).double()
    x = torch.randn(2, C, 5, 5, generator=gen, dtype=f64)
    g = torch.randn_like(conv(x))
    geo = ConvGeometry.of(conv)
    _, W, b, _ = prox_conv(x, g, conv.weight.detach(), True, geo, check_prox_args(10 ** log_tau, f'prox_cg{n_iter}', cg_tol=0, solver=route))
    grad = torch.cat([q.reshape(-1) for q in torch.autograd.grad((conv(x) * g).sum(), (conv.weight, conv.bias))])
    D = torch.cat([W.reshape(-1), b])
    assert D @ grad > 0


def test_cg_converges_to_exact():
    "The CG direction approaches the exact proximal direction as the iteration count grows"
    torch.manual_seed(0)
    x, g = torch.randn(30, 8, dtype=f64), torch.randn(30, 5, dtype=f64)
    exact = dense_direction(x, g, True, 0.5)
    errs = []
    for n in (1, 2, 4, 9):
        W, b, _ = prox_linear(x, g, True, check_prox_args(0.5, f'prox_cg{n}', cg_tol=0, solver='primal'))
        errs.append((torch.cat([W, b[:, None]], 1) - exact).norm().item() / exact.norm().item())
    assert errs[-1] < 1e-10
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_cg_tol_stops_early_and_zero_runs_all():
    "cg_tol stops at the first iteration whose largest residual is below cg_tol times the RMS initial residual"
    from proxprop_nb.solvers import block_cg
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=f64))
    M = Q @ torch.diag(torch.logspace(0, 4, 60, dtype=f64)) @ Q.T
    B = torch.randn(3, 60, generator=gen, dtype=f64)
    res = lambda X: ((B - X @ M) ** 2).sum(1)
    tol = 1e-3
    cg = block_cg(lambda P: [P[0] @ M], [B], 200, tol=tol)
    (X_tol,), k = cg.solution, cg.iterations
    assert 1 < k < 200
    assert res(X_tol).max() < tol ** 2 * (B ** 2).sum(1).mean()
    X_prev = block_cg(lambda P: [P[0] @ M], [B], k - 1).solution[0]
    assert res(X_prev).max() >= tol ** 2 * (B ** 2).sum(1).mean()
    k0 = block_cg(lambda P: [P[0] @ M], [B], 7, tol=0).iterations
    assert k0 == 7


# ---- dense solves of eq. (11) through the layers ---------------------------------------------------

@pytest.mark.parametrize('N', [5, 50])
@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg40'])
@pytest.mark.parametrize('solver', ['auto', 'dual', 'primal'])
def test_linear_layer_dense(N, mode, solver):
    torch.manual_seed(2)
    lin = ProxPropLinear(12, 4, tau_prox=0.3, optimization_mode=mode, cg_tol=0, solver=solver, dtype=f64)
    x, g = torch.randn(N, 12, dtype=f64), torch.randn(N, 4, dtype=f64)
    D = dense_direction(x, g, True, 0.3)
    got = backward_with(lin, x, g)
    torch.testing.assert_close(got, torch.cat([D[:, :-1].reshape(-1), D[:, -1]]), rtol=1e-8, atol=1e-10)


def test_gradient_mode_matches_autograd_conv():
    torch.manual_seed(3)
    base = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    prox = ProxPropConv2d(3, 5, 3, stride=2, padding=1, optimization_mode='gradient', dtype=f64)
    prox.load_state_dict(base.state_dict())
    x = torch.randn(4, 3, 9, 9, dtype=f64, requires_grad=True)
    g = torch.randn_like(base(x))
    ref = torch.autograd.grad(base(x), (x, base.weight, base.bias), g)
    got = torch.autograd.grad(prox(x), (x, prox.weight, prox.bias), g)
    for a, b in zip(got, ref): torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)




class _Scale(nn.Module):
    "A module linear in its parameter, not a Linear or a convolution: `proxprop_module` makes it a generic layer"
    def __init__(self, n): super().__init__(); self.weight = nn.Parameter(torch.linspace(-1, 1, n, dtype=f64))
    def forward(self, x): return x * self.weight

@pytest.mark.parametrize('make,shape', [
    (lambda mode: ProxPropLinear(6, 3, optimization_mode=mode, dtype=f64), (5, 6)),
    (lambda mode: ProxPropConv2d(2, 3, 3, padding=1, padding_mode='reflect', optimization_mode=mode, dtype=f64),
     (2, 2, 5, 5)),
    (lambda mode: proxprop_module(nn.Conv1d)(2, 3, 3, optimization_mode=mode, dtype=f64), (2, 2, 7)),
    (lambda mode: proxprop_module(_Scale)(6, optimization_mode=mode), (5, 6))])  # a generic module
def test_gradient_mode_is_the_base_module(make, shape):
    "In 'gradient' mode a layer runs its base module's forward and autograd's own backward: no Function, no record"
    x = torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer = make('prox_cg2')
    layer(x).sum().backward()
    assert isinstance(layer(x).grad_fn, torch.autograd.function.BackwardCFunction) and layer.last_solve is not None
    layer.optimization_mode = 'gradient'  # switched: the record of the last proximal step goes with it
    assert layer.last_solve is None
    out = layer(x)
    assert not isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction)
    base = unproxpropify(nn.Sequential(copy.deepcopy(layer)))[0]
    assert type(base) in (nn.Linear, nn.Conv2d, nn.Conv1d, _Scale)
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *layer.parameters()), g)
    ref = torch.autograd.grad(base(x), (x, *base.parameters()), g)
    for a, b in zip(got, ref): torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert layer.last_solve is None

def test_prox_exact_conv_matches_dense():
    "Exact Conv2d direction (stride 1, padding 2, the paper's ConvNet geometry) against the dense solve of its Jacobian"
    torch.manual_seed(4)
    conv = ProxPropConv2d(2, 3, 5, padding=2, tau_prox=0.7, optimization_mode='prox_exact', dtype=f64)
    x = torch.randn(3, 2, 6, 6, dtype=f64)
    g = torch.randn(3, 3, 6, 6, dtype=f64)
    got = backward_with(conv, x, g)
    torch.testing.assert_close(got, jacobian_direction(conv, x, g, 0.7)[0], rtol=1e-8, atol=1e-10)


def test_generic_conv1d_through_proxprop_module():
    torch.manual_seed(5)
    layer = proxprop_module(nn.Conv1d)(2, 3, 3, padding=1, tau_prox=0.5, optimization_mode='prox_exact').double()
    x, g = torch.randn(4, 2, 7, dtype=f64), torch.randn(4, 3, 7, dtype=f64)
    got = backward_with(layer, x, g)
    torch.testing.assert_close(got, jacobian_direction(layer, x, g, 0.5)[0], rtol=1e-8, atol=1e-10)


# ---- numerics: precision, fallbacks, non-finite values ---------------------------------------------

def test_bfloat16_model_solves_in_float32():
    torch.manual_seed(6)
    lin = ProxPropLinear(16, 8, optimization_mode='prox_exact', tau_prox=0.5)
    x, g = torch.randn(10, 16), torch.randn(10, 8)
    ref = dense_direction(x.bfloat16().float(), g.bfloat16().float(), True, 0.5)
    lin16 = copy.deepcopy(lin).to(torch.bfloat16)
    got = backward_with(lin16, x.bfloat16(), g.bfloat16())
    assert lin16.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), torch.cat([ref[:, :-1].reshape(-1), ref[:, -1]]), rtol=2e-2, atol=2e-2)


def test_nan_gradient_propagates_as_nan():
    "A diverging run: non-finite values reaching the backward give a NaN direction, never silent finite garbage"
    for mode in ('prox_exact', 'prox_cg3', 'gradient'):
        lin = ProxPropLinear(6, 3, optimization_mode=mode)
        x = torch.randn(4, 6)
        g = torch.randn(4, 3); g[1, 2] = float('nan')
        backward_with(lin, x, g)
        assert torch.isnan(lin.weight.grad).any(), mode


def test_cholesky_failure_falls_back_with_warning():
    x = torch.ones(50, 8)  # rank one: the primal Gram is singular in float32 for a huge tau_prox
    g = torch.randn(50, 3)
    with pytest.warns(RuntimeWarning, match='falling back to'):
        W, b, _ = prox_linear(x, g, True, check_prox_args(1e30, 'prox_exact', solver='primal'))
    assert torch.isfinite(W).all() and torch.isfinite(b).all()


def test_dead_units_get_zero_direction():
    torch.manual_seed(7)
    for mode in ('prox_cg3', 'prox_exact'):
        lin = ProxPropLinear(10, 4, optimization_mode=mode, cg_tol=0)
        x, g = torch.randn(8, 10), torch.randn(8, 4)
        g[:, 1] = 0
        backward_with(lin, x, g)
        assert torch.all(lin.weight.grad[1] == 0) and lin.bias.grad[1] == 0


# ---- training, conversion, housekeeping -------------------------------------------------------------

def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 20, generator=g)
    y = (X[:, :5].sum(1) > 0).long() + (X[:, 5:8].sum(1) > 1).long()
    return X, y


@pytest.mark.parametrize('opt', ['sgd', 'adam'])
@pytest.mark.parametrize('mode', ['prox_cg3', 'prox_exact'])
def test_training_smoke(opt, mode):
    torch.manual_seed(8)
    X, y = _toy()
    model = proxpropify(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)),
                        tau_prox=1.0, optimization_mode=mode, last_explicit=True)
    optim = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True) if opt == 'sgd'
             else torch.optim.Adam(model.parameters(), lr=1e-2))
    loss0 = nn.functional.cross_entropy(model(X), y).item()
    for epoch in range(30):
        for i in range(0, 256, 64):
            optim.zero_grad()
            nn.functional.cross_entropy(model(X[i:i + 64]), y[i:i + 64]).backward()
            optim.step()
    loss1 = nn.functional.cross_entropy(model(X), y).item()
    assert loss1 < 0.5 * loss0


def test_convnet_training_smoke():
    torch.manual_seed(9)
    X = torch.randn(64, 3, 8, 8); y = (X[:, 0].mean((1, 2)) > 0).long()
    model = proxpropify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 2)),
                        optimization_mode='prox_cg3', last_explicit=True)
    assert isinstance(model[0], ProxPropConv2d) and type(model[4]) is nn.Linear
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss0 = nn.functional.cross_entropy(model(X), y).item()
    for _ in range(40):
        optim.zero_grad(); nn.functional.cross_entropy(model(X), y).backward(); optim.step()
    assert nn.functional.cross_entropy(model(X), y).item() < 0.5 * loss0


def test_proxpropify_round_trip_and_exclude():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(4 * 6 * 6, 10), nn.ReLU()), nn.Linear(10, 2))
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    params = list(model.parameters())
    proxpropify(model, tau_prox=0.5, optimization_mode='prox_exact', exclude=['3.0'])
    assert isinstance(model[0], ProxPropConv2d) and type(model[3][0]) is nn.Linear and isinstance(model[4], ProxPropLinear)
    assert model[0].tau_prox == 0.5 and model[4].optimization_mode == 'prox_exact'
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), out)
    unproxpropify(model)
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Linear
    torch.testing.assert_close(model(x), out)
    with pytest.raises(ValueError, match='exclude names no module'):
        proxpropify(model, exclude=['nope'])
    with pytest.raises(ValueError, match='tau_prox'):
        proxpropify(model, tau_prox=-1)


def test_proxpropify_types():
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10), nn.Conv1d(1, 1, 1))
    m = proxpropify(make())  # None: Linear and Conv2d
    assert isinstance(m[0], ProxPropConv2d) and isinstance(m[2], ProxPropLinear) and type(m[3]) is nn.Conv1d
    m = proxpropify(make(), types=nn.Linear)  # one class, not a tuple
    assert type(m[0]) is nn.Conv2d and isinstance(m[2], ProxPropLinear)
    m = proxpropify(make(), types=[nn.Conv1d])
    assert type(m[0]) is nn.Conv2d and type(m[2]) is nn.Linear and isinstance(m[3], nn.Conv1d) and type(m[3]) is not nn.Conv1d


def test_layer_device_dtype_positional_and_keyword_only_settings():
    lin = ProxPropLinear(3, 2, True, 'cpu', f64, tau_prox=0.5)
    assert lin.weight.dtype == f64 and lin.tau_prox == 0.5
    with pytest.raises(TypeError):
        ProxPropLinear(3, 2, True, 'cpu', f64, 0.5)  # the ProxProp settings are keyword-only
    conv = ProxPropConv2d(1, 2, 3, 1, 0, 1, 1, True, 'zeros', 'cpu', f64, optimization_mode='prox_exact')
    assert conv.weight.dtype == f64 and conv.optimization_mode == 'prox_exact'


def test_state_dict_pickle_deepcopy_to():
    lin = ProxPropLinear(4, 3, tau_prox=0.2, optimization_mode='prox_cg2')
    base = nn.Linear(4, 3)
    base.load_state_dict(lin.state_dict())
    lin.load_state_dict(base.state_dict())
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert type(clone) is ProxPropLinear and clone.tau_prox == 0.2 and clone.optimization_mode == 'prox_cg2'
        torch.testing.assert_close(clone.weight, lin.weight)
    Conv3d = proxprop_module(nn.Conv3d)
    c = Conv3d(2, 2, 2, optimization_mode='prox_cg1')
    c2 = pickle.loads(pickle.dumps(c))
    assert type(c2) is Conv3d and c2.optimization_mode == 'prox_cg1'
    assert lin.to(f64).weight.dtype == f64


def test_settings_change_between_steps():
    torch.manual_seed(11)
    lin = ProxPropLinear(6, 2, dtype=f64, optimization_mode='gradient')
    x, g = torch.randn(9, 6, dtype=f64), torch.randn(9, 2, dtype=f64)
    backward_with(lin, x, g)
    lin.optimization_mode, lin.tau_prox = 'prox_exact', 0.25
    got = backward_with(lin, x, g)
    D = dense_direction(x, g, True, 0.25)
    torch.testing.assert_close(got, torch.cat([D[:, :-1].reshape(-1), D[:, -1]]), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('kwargs, match', [
    (dict(tau_prox=0), 'tau_prox=0'), (dict(tau_prox=-2.0), 'tau_prox'), (dict(tau_prox=float('inf')), 'finite'),
    (dict(tau_prox='1'), 'tau_prox'), (dict(optimization_mode='prox_cg0'), 'prox_cgN'), (dict(optimization_mode='sgd'), 'not valid'),
    (dict(cg_tol=-0.1), 'cg_tol'), (dict(cg_tol=float('nan')), 'cg_tol'), (dict(cg_variant='x'), 'textbook'),
    (dict(solver='magic'), 'solver'), (dict(optimization_mode='prox_exact', solver='matrix_free'), 'prox_cgN')])
def test_bad_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProxPropLinear(3, 2, **kwargs)
    with pytest.raises(ValueError, match=match):
        ProxPropConv2d(3, 2, 3, **kwargs)


def test_frozen_layer_and_no_grad():
    lin = ProxPropLinear(5, 3, optimization_mode='prox_exact')
    lin.requires_grad_(False)
    x = torch.randn(4, 5, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(4, 5))
    with torch.no_grad():
        assert not lin(torch.randn(2, 5)).requires_grad


# ---- against the penalty notebook's Algorithm 2 (the paper's reference implementation) -------------

@pytest.mark.parametrize('sigma', [torch.tanh, torch.relu])
@pytest.mark.parametrize('tau, tau_prox', [(0.3, 0.05), (1.0, 1.0), (5.0, 20.0)])
def test_one_step_equals_algorithm_2(sigma, tau, tau_prox):
    "One SGD step (lr tau, no momentum) on an MLP of exact ProxProp layers, last layer explicit, is Algorithm 2"
    from proxprop_nb.penalty import proxprop_step
    torch.manual_seed(12)
    sizes = [7, 9, 6, 5, 3]
    X, y = torch.randn(11, sizes[0], dtype=f64), torch.randint(0, 3, (11,))
    layers = [nn.Linear(a, b, dtype=f64) for a, b in zip(sizes[:-1], sizes[1:])]
    params = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in layers]
    expected = proxprop_step(params, X, y, tau, tau_prox, sigma=sigma)

    class Net(nn.Module):
        def __init__(self):
            super().__init__(); self.layers = nn.ModuleList(layers)
        def forward(self, x):
            for l in self.layers[:-1]: x = sigma(l(x))
            return self.layers[-1](x)
    net = proxpropify(Net(), tau_prox=tau_prox, optimization_mode='prox_exact', last_explicit=True)
    assert [type(l) for l in net.layers] == [ProxPropLinear] * 3 + [nn.Linear]
    opt = torch.optim.SGD(net.parameters(), lr=tau)
    nn.functional.cross_entropy(net(X), y).backward()
    opt.step()
    for l, (W, b) in zip(net.layers, expected):
        torch.testing.assert_close(l.weight.detach(), W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(l.bias.detach(), b, rtol=1e-10, atol=1e-12)


def test_conv_official_variant_is_one_flattened_cg():
    "cg_variant='official' on a convolution reproduces the official code: one CG over all parameters flattened, P aliasing R"
    torch.manual_seed(13)
    conv = ProxPropConv2d(2, 3, 3, padding=1, tau_prox=0.5, optimization_mode='prox_cg3', cg_variant='official', cg_tol=0, dtype=f64)
    x, g = torch.randn(2, 2, 5, 5, dtype=f64), torch.randn(2, 3, 5, 5, dtype=f64)
    got = backward_with(conv, x, g)
    assert conv.last_route == 'matrix_free'
    J = jacobian_direction(conv, x, g, 0.5)[1]
    M, grad = J.T @ J + torch.eye(J.shape[1], dtype=f64) / 0.5, J.T @ g.flatten()
    # the official iteration, transcribed in theta form from theta0 (one column; P is R at the start; 1e-6 in denominators)
    theta0 = torch.randn(J.shape[1], dtype=f64)
    X = theta0.clone(); R = (M @ theta0 - grad) - M @ X; P = R; rs = R @ R
    for k in range(1, 4):
        AP = M @ P; alpha = rs / (P @ AP + 1e-6); X = X + alpha * P
        if k == 3: break
        R -= alpha * AP; rs_new = R @ R
        P = R + P * (rs_new / (rs + 1e-6)); rs = rs_new
    torch.testing.assert_close(got, theta0 - X, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg3', 'gradient'])
def test_torch_func_grad_gives_the_step_that_backward_gives(mode):
    # inside a torch.func transform the layers take their setup_context twins (the fast Functions have none)
    from torch.func import grad, functional_call
    torch.manual_seed(0)
    model = nn.Sequential(ProxPropConv2d(2, 3, 3, padding=1, optimization_mode=mode, tau_prox=0.5), nn.Flatten(),
                          ProxPropLinear(3 * 16, 4, optimization_mode=mode, tau_prox=0.5)).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    loss = lambda out: out.pow(2).sum()
    params = {k: v.detach() for k, v in model.named_parameters()}
    steps = grad(lambda p: loss(functional_call(model, p, (x,))))(params)
    loss(model(x)).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(steps[name], p.grad, rtol=1e-12, atol=1e-14), name
