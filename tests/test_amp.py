"""ProxProp layers under torch.autocast (bf16 and fp16) and GradScaler, on the CPU, against the full-precision step and autograd."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from proxprop_nb import ProxPropLinear, ProxPropConv2d, proxprop_module, proxpropify, unproxpropify


class Proj(nn.Module):
    "A generic module linear in its weight (a matmul, which autocast lowers)"
    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i ** 0.5)

    def forward(self, x): return x @ self.weight


LAYERS = {
    'linear': (lambda **p: ProxPropLinear(12, 5, **p), (7, 12)),
    'conv2d': (lambda **p: ProxPropConv2d(3, 4, 3, padding=1, **p), (2, 3, 6, 6)),
    'conv1d': (lambda **p: proxprop_module(nn.Conv1d)(2, 3, 3, **p), (3, 2, 9)),
    'convtranspose2d': (lambda **p: proxprop_module(nn.ConvTranspose2d)(2, 3, 3, stride=2, **p), (2, 2, 3, 4)),
    'generic': (lambda **p: proxprop_module(Proj)(6, 3, **p), (5, 6)),
}
# Largest relative error of the direction against the full-precision one: the output gradient is rounded to the
# autocast dtype (unit roundoff 2^-8 for bf16, 2^-11 for fp16); measured on this CPU up to 6e-3 (bf16), 1e-3 (fp16)
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel(a, b): return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def base_of(layer):
    "The plain PyTorch twin of a ProxProp layer, sharing nothing"
    return unproxpropify(nn.Sequential(copy.deepcopy(layer)))[0]


def step(layer, x, g, dtype=None):
    "(output, input grad, param grads) of one backward pass with output gradient g, under autocast(dtype) if given"
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = layer(x)
    out.backward(g.to(out.dtype))
    return out, x.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_autocast_step(name, mode, dtype):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make(optimization_mode=mode, tau_prox=0.5, cg_tol=0)
    x = torch.randn(*shape)
    out_ref, _, d_ref = step(layer, x, g := torch.randn_like(layer(x)))
    out, gx, d = step(layer, x, g, dtype)
    base = base_of(layer)
    out_base, gx_base, grads_base = step(base, x, g, dtype)
    assert out.dtype == out_base.dtype == dtype  # the forward runs in the autocast dtype, as the base module's
    torch.testing.assert_close(out, out_base, rtol=0, atol=0)
    assert gx.dtype == gx_base.dtype == torch.float32  # the input gradient has autograd's dtype and values
    torch.testing.assert_close(gx, gx_base, rtol=1e-6, atol=1e-6)
    assert [q.dtype for q in d] == [p.dtype for p in layer.parameters()]  # .grad in the parameter's dtype
    if mode == 'gradient':
        for q, r in zip(d, grads_base): torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-6)
    assert max(rel(q, r) for q, r in zip(d, d_ref)) < TOL[dtype]  # the solve runs in float32


@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
def test_gradscaler_skips_overflowing_step(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    proxpropify(model, optimization_mode=mode, last_explicit=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))

    def scaled_step(scaler):
        opt.zero_grad()
        with torch.autocast('cpu', dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt); scaler.update()
        return [torch.equal(a, p) for a, p in zip(before, model.parameters())]

    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 60)  # the scaled fp16 gradients overflow
    assert all(scaled_step(scaler))  # inf reached every .grad: the step was skipped
    assert scaler.get_scale() < 2.0 ** 60  # and the scale backed off
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    assert not any(scaled_step(scaler))  # a sane scale: every parameter moves
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float64_model_is_untouched_by_autocast():
    torch.manual_seed(0)
    lin = ProxPropLinear(6, 3, optimization_mode='prox_exact', dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64)
    out_ref, gx_ref, d_ref = step(lin, x, g)
    out, gx, d = step(lin, x, g, torch.bfloat16)
    assert out.dtype == torch.float64
    torch.testing.assert_close(d[0], d_ref[0], rtol=0, atol=0)
