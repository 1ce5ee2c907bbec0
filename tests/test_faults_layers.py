"""Fault cases of the library's layers (hardening issue 23, item 1): no silent wrong step. Each case is
checked against an independent dense float64 solve of the proximal step (the Jacobian of the plain PyTorch
module), or against the refusal in words that replaces a wrong result."""
import copy
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from proxprop_nb import ProxPropConv2d, ProxPropLinear, proxprop_module, proxpropify, unproxpropify
from proxprop_nb.layers import ProxPropMixin

f64 = torch.float64
TAU = 0.4


def calls_of(base, loss_of):
    "Each call's (input, output gradient) of the plain module `base` in loss_of(base).backward()"
    calls = []
    def keep(module, inputs, out):
        out.retain_grad(); calls.append((inputs[0].detach(), out))
    handle = base.register_forward_hook(keep)
    loss_of(base).backward()
    handle.remove()
    return [(x, out.grad.detach()) for x, out in calls]


def jacobian(base, x):
    "The Jacobian of the plain module's output at `x` in its parameters (columns in named_parameters order)"
    names, ps = zip(*[(n, p.detach()) for n, p in base.named_parameters()])
    f = lambda *q: torch.func.functional_call(base, dict(zip(names, q)), (x,)).flatten()
    return torch.cat([j.flatten(1) for j in torch.autograd.functional.jacobian(f, ps)], 1)


def dense_step(base, calls, tau=TAU, trained=None):
    "Solve (J_t^T J_t + I/tau) d = J_t^T g for the stacked calls; J_t: the columns of the trained parameters"
    J = torch.cat([jacobian(base, x) for x, _ in calls])
    g = torch.cat([g.flatten() for _, g in calls])
    sizes = [p.numel() for p in base.parameters()]
    trained = trained or [True] * len(sizes)
    keep = torch.cat([torch.full((n,), t) for n, t in zip(sizes, trained)])
    Jt = J[:, keep]
    d = torch.linalg.solve(Jt.T @ Jt + torch.eye(Jt.shape[1], dtype=J.dtype) / tau, Jt.T @ g)
    steps, parts = iter(d.split([n for n, t in zip(sizes, trained) if t])), []
    for p, t in zip(base.parameters(), trained): parts.append(next(steps).view(p.shape) if t else None)
    return parts


def twin_of(base, mode='prox_exact', **kw):
    "The ProxProp twin of a copy of `base`"
    model = nn.Sequential(copy.deepcopy(base))
    return proxpropify(model, tau_prox=TAU, optimization_mode=mode, cg_tol=0, **kw)[0]


def check_step(layer, reference, eps=1e-9):
    for p, r in zip(layer.parameters(), reference):
        if r is None: assert p.grad is None
        else: torch.testing.assert_close(p.grad, r, rtol=eps, atol=eps)


# ---- a module at several positions of a model --------------------------------------------------------------

def test_module_reused_in_a_sequential_is_converted_at_every_position_and_back():
    lin = nn.Linear(4, 4)
    model = proxpropify(nn.Sequential(lin, nn.Tanh(), lin))
    assert isinstance(model[0], ProxPropLinear) and model[2] is model[0] and model[0].weight is lin.weight
    unproxpropify(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0] and model[0].weight is lin.weight


class TwoNames(nn.Module):
    "One Linear registered under two names"
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(3, 3)
        self.decode = self.encode
    def forward(self, x): return self.decode(torch.tanh(self.encode(x)))


def test_module_under_two_names_is_converted_under_both_and_excluded_under_either():
    model = proxpropify(TwoNames())
    assert isinstance(model.encode, ProxPropLinear) and model.decode is model.encode
    unproxpropify(model)
    assert type(model.encode) is nn.Linear and model.decode is model.encode
    for name in ('encode', 'decode'):  # excluded by one of its names: plain at both (the sharing kept)
        model = proxpropify(TwoNames(), exclude=(name,))
        assert type(model.encode) is nn.Linear and model.decode is model.encode


# ---- a layer called several times in one forward: one joint proximal step ----------------------------------

def recurrent(times):
    "loss_of(layer): `times` applications of the layer, through tanh, then a fixed random weighting"
    gen = torch.Generator().manual_seed(times)
    x, w = torch.randn(5, 2, 4, generator=gen, dtype=f64), torch.randn(5, 2, 4, generator=gen, dtype=f64)
    def loss_of(layer):
        h = x
        for _ in range(times): h = layer(torch.tanh(h))
        return (h * w).sum()
    return loss_of


@pytest.mark.parametrize('times', [2, 3])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg40'])
def test_linear_called_several_times_takes_the_joint_step(times, bias, mode):
    torch.manual_seed(0)
    base, loss_of = nn.Linear(4, 4, bias=bias).double(), recurrent(times)
    reference = dense_step(base, calls_of(copy.deepcopy(base), loss_of))
    layer = twin_of(base, mode)
    loss_of(layer).backward()
    check_step(layer, reference, 1e-9 if mode == 'prox_exact' else 1e-7)


def test_joint_step_is_added_to_the_gradient_held_before_and_reaches_autograd_grad():
    torch.manual_seed(1)
    base, loss_of = nn.Linear(4, 4).double(), recurrent(2)
    reference = dense_step(base, calls_of(copy.deepcopy(base), loss_of))
    layer = twin_of(base)
    held = [torch.ones_like(p) for p in layer.parameters()]
    for p, h in zip(layer.parameters(), held): p.grad = h.clone()
    loss_of(layer).backward()
    check_step(layer, [r + h for r, h in zip(reference, held)])
    got = torch.autograd.grad(loss_of(layer), list(layer.parameters()))
    for a, r in zip(got, reference): torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


def test_shared_module_of_a_sequential_takes_the_joint_step():
    torch.manual_seed(2)
    lin = nn.Linear(4, 4).double()
    x, w = torch.randn(6, 4, dtype=f64), torch.randn(6, 4, dtype=f64)
    loss_of = lambda model: (model(x) * w).sum()
    plain = nn.Sequential(lin, nn.Tanh(), lin)
    calls = calls_of(copy.deepcopy(lin), lambda l: loss_of(nn.Sequential(l, nn.Tanh(), l)))
    reference = dense_step(lin, calls)
    model = proxpropify(copy.deepcopy(plain), tau_prox=TAU, optimization_mode='prox_exact')
    loss_of(model).backward()
    check_step(model[0], reference)


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg60'])
def test_conv_called_twice_takes_the_joint_step(mode):
    torch.manual_seed(3)
    base = nn.Conv2d(2, 2, 3, padding=1).double()
    x, w = torch.randn(2, 2, 5, 5, dtype=f64), torch.randn(2, 2, 5, 5, dtype=f64)
    loss_of = lambda conv: (conv(torch.tanh(conv(x))) * w).sum()
    reference = dense_step(base, calls_of(copy.deepcopy(base), loss_of))
    layer = twin_of(base, mode)
    loss_of(layer).backward()
    check_step(layer, reference, 1e-9 if mode == 'prox_exact' else 1e-7)


class Square(nn.Module):
    "x @ W: linear in W, a module for proxprop_module's generic step"
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)
    def forward(self, x): return x @ self.weight


@pytest.mark.parametrize('mode', ['prox_exact', 'prox_cg40'])
def test_generic_module_called_twice_takes_the_joint_step(mode):
    torch.manual_seed(7)
    base, loss_of = Square().double(), recurrent(2)
    reference = dense_step(base, calls_of(copy.deepcopy(base), loss_of))
    layer = proxprop_module(Square)(tau_prox=TAU, optimization_mode=mode, cg_tol=0).double()
    layer.load_state_dict(base.state_dict())
    loss_of(layer).backward()
    check_step(layer, reference, 1e-9 if mode == 'prox_exact' else 1e-7)


@pytest.mark.parametrize('how', ['retain_graph', 'checkpoint', 'checkpoint-reentrant'])
def test_joint_step_under_retain_graph_and_activation_checkpointing(how):
    "Each backward pass of a retained graph takes the joint step; a recomputed forward joins no group"
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(9)
    base, loss_of = nn.Linear(4, 4).double(), recurrent(2)
    reference = dense_step(base, calls_of(copy.deepcopy(base), loss_of))
    layer = twin_of(base)
    if how == 'retain_graph':
        loss = loss_of(layer)
        loss.backward(retain_graph=True); loss.backward()
        return check_step(layer, [2 * r for r in reference])
    shift = torch.zeros((), dtype=f64, requires_grad=True)  # reentrant checkpointing needs such an input
    checkpoint(lambda t: loss_of(layer) + t, shift, use_reentrant=how.endswith('reentrant')).backward()
    check_step(layer, reference)
    layer.zero_grad(); loss_of(layer).backward()  # the next step as without checkpointing
    check_step(layer, reference)


def test_conv_called_on_inputs_of_different_shapes_is_refused_in_words():
    conv = ProxPropConv2d(2, 2, 3, padding=1, optimization_mode='prox_exact')
    loss = conv(torch.randn(2, 2, 5, 5)).sum() + conv(torch.randn(2, 2, 7, 7)).sum()
    with pytest.raises(NotImplementedError, match=r'ProxPropConv2d was called 2 times .* different shapes'):
        loss.backward()


def test_a_call_left_out_of_the_backward_pass_gets_no_step():
    "Two calls alive, one in the loss: the step of that call alone (as before)"
    torch.manual_seed(4)
    base = nn.Linear(4, 3).double()
    x1, x2, w = torch.randn(5, 4, dtype=f64), torch.randn(7, 4, dtype=f64), torch.randn(7, 3, dtype=f64)
    reference = dense_step(base, [(x2, w)])
    layer = twin_of(base)
    kept = layer(x1)
    (layer(x2) * w).sum().backward()
    check_step(layer, reference)
    assert kept.grad_fn is not None


# ---- submodules used through their weights -----------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2), nn.Linear(8, 8)
    def forward(self, x): return self.head(self.attn(x, x, x)[0])


def test_attention_out_proj_is_left_plain_with_a_warning_naming_it():
    model = Attention()
    with pytest.warns(UserWarning, match=r"'attn\.out_proj'.*MultiheadAttention.*never calls"):
        proxpropify(model, types=(nn.Linear, NonDynamicallyQuantizableLinear))
    assert type(model.attn.out_proj) is NonDynamicallyQuantizableLinear
    assert isinstance(model.head, ProxPropLinear)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # excluded: nothing to warn about
        proxpropify(Attention(), types=(nn.Linear, NonDynamicallyQuantizableLinear),
                    exclude=('attn.out_proj',))
        proxpropify(Attention())  # the default types do not reach out_proj (exact type match)


# ---- complex parameters ------------------------------------------------------------------------------------

def test_complex_parameters_are_refused_in_words():
    with pytest.raises(TypeError, match=r'ProxPropLinear: complex parameters \(weight: torch\.complex64, b'):
        ProxPropLinear(3, 2, dtype=torch.cfloat)
    with pytest.raises(TypeError, match=r'ProxPropConv2d: complex parameters'):
        ProxPropConv2d(2, 2, 3, dtype=torch.cdouble)
    with pytest.raises(TypeError, match=r"'1' \(Linear\): complex parameters"):
        proxpropify(nn.Sequential(nn.Tanh(), nn.Linear(3, 2, dtype=torch.cfloat)))
    layer = ProxPropLinear(3, 2).to(torch.cfloat)  # made complex after construction: refused at its backward
    with pytest.raises(TypeError, match='ProxPropLinear: complex parameters'):
        layer(torch.randn(4, 3, dtype=torch.cfloat)).abs().sum().backward()


# ---- frozen parameters: the system restricted to the trained ones ------------------------------------------

@pytest.mark.parametrize('frozen', ['weight', 'bias'])
@pytest.mark.parametrize('make', [lambda: nn.Linear(4, 3), lambda: nn.Conv2d(2, 3, 3, padding=1)],
                         ids=['linear', 'conv'])
def test_frozen_parameter_takes_the_system_restricted_to_the_trained_ones(frozen, make):
    torch.manual_seed(5)
    base = make().double()
    x = torch.randn(6, 4, dtype=f64) if isinstance(base, nn.Linear) else torch.randn(2, 2, 5, 5, dtype=f64)
    g = torch.randn_like(base(x))
    trained = [frozen != 'weight', frozen != 'bias']
    reference = dense_step(base, [(x, g)], trained=trained)
    layer = twin_of(base)
    getattr(layer, frozen).requires_grad_(False)
    layer(x).backward(g)
    check_step(layer, reference)


class PairBilinear(nn.Bilinear):
    "nn.Bilinear on the two halves of one input (linear in its weight and bias jointly)"
    def forward(self, x): return super().forward(*x.chunk(2, dim=-1))


def test_frozen_weight_of_a_generic_module_takes_the_bias_system():
    torch.manual_seed(6)
    base = PairBilinear(3, 3, 2).double()
    x = torch.randn(5, 6, dtype=f64)
    g = torch.randn_like(base(x))
    reference = dense_step(base, [(x, g)], trained=[False, True])
    layer = proxprop_module(PairBilinear)(3, 3, 2, tau_prox=TAU, optimization_mode='prox_exact').double()
    layer.load_state_dict(base.state_dict())
    layer.weight.requires_grad_(False)
    layer(x).backward(g)
    check_step(layer, reference)


# ---- frozen parameters under DistributedDataParallel: two gloo processes take the one-process step ---------

def frozen_net():
    "A float64 MLP whose first layer has a frozen weight and whose second has a frozen bias, and its data"
    torch.manual_seed(8)
    net = proxpropify(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double(), tau_prox=TAU,
                      optimization_mode='prox_exact')
    net[0].weight.requires_grad_(False); net[2].bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(9)
    return net, torch.randn(12, 6, generator=gen, dtype=f64), torch.randn(12, 3, generator=gen, dtype=f64)


def trained_grads(net): return [p.grad.tolist() for p in net.parameters() if p.requires_grad]


def ddp_worker(rank, world, port, out):
    "One process: its share of the batch under DDP; writes the trained parameters' .grad"
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    net, x, y = frozen_net()
    n = len(x) // world
    part = slice(rank * n, (rank + 1) * n)
    ddp = DistributedDataParallel(net)  # kept: its reducer averages the gradients in the backward pass
    ((ddp(x[part]) - y[part]) ** 2).mean().backward()
    routes = [net[0].last_route, net[2].last_route]
    with open(out, 'w') as f: json.dump(dict(grads=trained_grads(net), routes=routes), f)
    dist.barrier(); dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_frozen_parameters_under_ddp_take_the_one_process_step(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    worker = lambda r: [sys.executable, __file__, str(r), '2', str(port), str(tmp_path / f'{r}.json')]
    procs = [subprocess.Popen(worker(r), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    net, x, y = frozen_net()
    ((net(x) - y) ** 2).mean().backward()
    for r in range(2):
        assert (tmp_path / f'{r}.json').is_file(), logs[r][-3000:]
        got = json.loads((tmp_path / f'{r}.json').read_text())
        assert got['routes'] == ['bias', 'gather>primal'], got['routes']
        for a, b in zip(got['grads'], trained_grads(net)):
            torch.testing.assert_close(torch.tensor(a, dtype=f64), torch.tensor(b, dtype=f64),
                                       rtol=1e-10, atol=1e-12)


if __name__ == '__main__':  # a worker of the DDP test above: RANK WORLD PORT OUT
    torch.set_num_threads(1)
    ddp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
