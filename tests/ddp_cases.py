"""Worker of tests/test_distributed.py: one process of a gloo group on 127.0.0.1, checking the data-parallel ProxProp step.

Run as `python tests/ddp_cases.py RANK WORLD PORT OUT.json [DEVICE]`; every process writes its own results file.
DEVICE 'cuda' puts the models and data on the (one) GPU; the collectives still go through gloo."""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import proxprop_nb.distributed as PD
from proxprop_nb import proxpropify, proxprop_module
from proxprop_nb.layers import ProxPropMixin
from proxprop_nb.distributed import linear_routes, conv_routes, exit_process_group

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)
DEV = sys.argv[5] if len(sys.argv) > 5 else 'cpu'
N = 24  # the global batch: 12 per process for R = 2, 8 for R = 3
MODES = {'exact': dict(optimization_mode='prox_exact'), 'cg3': dict(optimization_mode='prox_cg3', cg_tol=0.),
         'cg3-official': dict(optimization_mode='prox_cg3', cg_tol=0., cg_variant='official'),
         'cg3-tol': dict(optimization_mode='prox_cg3'),
         'exact-dual': dict(optimization_mode='prox_exact', solver='dual'), 'cg3-dual': dict(optimization_mode='prox_cg3', cg_tol=0., solver='dual')}


def mlp(): return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
def convnet(): return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
def otherconv(): return nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.ConvTranspose1d(4, 2, 3, stride=2), nn.Flatten(), nn.Linear(2 * 13, 5))
NETS = {'mlp': (mlp, (20,)), 'convnet': (convnet, (3, 8, 8)), 'otherconv': (otherconv, (3, 8))}
TYPES = {'otherconv': (nn.Conv1d, nn.ConvTranspose1d)}


def make(net, mode, seed=0):
    build, shape = NETS[net]
    torch.manual_seed(seed)
    model = build()
    kinds = (nn.Linear, nn.Conv2d) + TYPES.get(net, ())
    for k in TYPES.get(net, ()): proxprop_module(k)
    return proxpropify(model, tau_prox=0.5, last_explicit=True, types=kinds, **MODES[mode]).to(DEV), shape


def data(shape):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, *shape, generator=g).to(DEV), torch.randint(0, 5, (N,), generator=g).to(DEV)


def grads(model): return [p.grad.detach().clone() for p in model.parameters()]


def rel(a, b): return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item() for x, y in zip(a, b))


def reference(net, mode, steps=1):
    model, shape = make(net, mode)
    X, y = data(shape)
    for _ in range(steps): F.cross_entropy(model(X), y).backward()
    return grads(model)


def ddp_step(net, mode, rank, world, route='auto', distributed='auto', steps=1, local_n=None):
    model, shape = make(net, mode)
    for m in model.modules():
        if isinstance(m, ProxPropMixin): m.distributed, m.distributed_route = distributed, route
    d = DDP(model)
    X, y = data(shape)
    n = N // world
    lo, hi = rank * n, (rank + 1) * n if local_n is None else rank * n + local_n
    for _ in range(steps): F.cross_entropy(d(X[lo:hi]), y[lo:hi]).backward()
    return grads(model), model


def applies(net, mode, route):
    if route in ('auto', 'gather'): return True
    if net == 'otherconv' and route == 'gram': return False  # a transposed convolution has no patch Gram route
    if mode.startswith('cg3-official') and route == 'gram' and net != 'mlp': return False  # official CG: one vector per layer
    if mode.startswith('exact') and route == 'cg': return False
    return True


def run(rank, world):
    out = {}
    # 1. the global step equals the one-process step on the whole batch, for every case
    for net in NETS:
        for mode in MODES:
            if mode.endswith('-dual') and net != 'mlp': continue  # the dual route is a Linear one
            ref = reference(net, mode)
            for route in ('auto', 'gather', 'gram', 'cg'):
                if not applies(net, mode, route): continue
                got, model = ddp_step(net, mode, rank, world, route)
                routes = sorted({m.last_route for m in model.modules() if isinstance(m, ProxPropMixin)})
                out[f'equal/{net}/{mode}/{route}'] = dict(rel=rel(got, ref), routes=routes)
    # 2. local: each process's own batch, a different algorithm
    got, _ = ddp_step('mlp', 'exact', rank, world, distributed='local')
    out['local/differs'] = dict(rel=rel(got, reference('mlp', 'exact')))
    # 3. gradient accumulation over two backward passes
    got, _ = ddp_step('convnet', 'cg3', rank, world, steps=2)
    out['equal/accumulate'] = dict(rel=rel(got, reference('convnet', 'cg3', steps=2)))
    # 3b. torch.compile around DDP and DDP around torch.compile give the same global step
    for how in ('compile(ddp)', 'ddp(compile)'):
        model, shape = make('mlp', 'cg3')
        d = torch.compile(DDP(model)) if how == 'compile(ddp)' else DDP(torch.compile(model))
        X, y = data(shape)
        n = N // world
        F.cross_entropy(d(X[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        out[f'equal/{how}'] = dict(rel=rel(grads(model), reference('mlp', 'cg3')),
                                   routes=sorted({m.last_route for m in model.modules() if isinstance(m, ProxPropMixin)}))
    # 3c. a layer with a frozen bias (or weight) takes the global step of what is trained
    for net, mode, first in (('mlp', 'exact', 0), ('convnet', 'cg3', 0)):
        def frozen(seed=0):
            model, shape = make(net, mode, seed)
            model[first].bias.requires_grad_(False)
            return model, shape
        ref, shape = frozen(); X, y = data(shape)
        F.cross_entropy(ref(X), y).backward()
        model, _ = frozen(); d = DDP(model); n = N // world
        F.cross_entropy(d(X[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        pairs = [(a.grad, b.grad) for a, b in zip(model.parameters(), ref.parameters()) if b.grad is not None]
        out[f'equal/frozen-bias/{net}/{mode}'] = dict(rel=rel(*zip(*pairs)), routes=[model[first].last_route],
                                                     untouched=model[first].bias.grad is None)
    # 3d. a backward pass that raised leaves nothing behind: the next one takes the global step again
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x): return x.clone()
        @staticmethod
        def backward(ctx, g): raise ValueError('boom')
    model, shape = make('mlp', 'cg3'); d = DDP(model); X, y = data(shape); n = N // world
    try: F.cross_entropy(d(Boom.apply(X[rank * n:(rank + 1) * n].requires_grad_())), y[rank * n:(rank + 1) * n]).backward()
    except Exception as e: out['raised'] = str(e)
    got, _ = ddp_step('mlp', 'cg3', rank, world)
    out['equal/after-failed-backward'] = dict(rel=rel(got, reference('mlp', 'cg3')), pending=sum(map(len, PD._PENDING.values())))
    # 4. DDP still broadcasts rank 0's initial parameters
    model, _ = make('mlp', 'exact', seed=100 + rank)
    DDP(model)
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref0 = torch.cat([p.detach().reshape(-1) for p in make('mlp', 'exact', seed=100)[0].parameters()])
    out['broadcast'] = dict(equal=bool(torch.equal(mine, ref0)))
    # 5. the bytes handed to collectives, counted, against the formulas
    sent = []
    real_reduce, real_gather = dist.all_reduce, PD._all_gather_single
    def count_reduce(t, *a, **k): sent.append(('all_reduce', t.numel() * t.element_size())); return real_reduce(t, *a, **k)
    def count_gather(o, t, *a, **k): sent.append(('all_gather', t.numel() * t.element_size())); return real_gather(o, t, *a, **k)
    PD.dist.all_reduce, PD._all_gather_single = count_reduce, count_gather
    try:
        from proxprop_nb.solvers import check_prox_args
        for net, mode, route in [('mlp', 'cg3', r) for r in ('gather', 'gram', 'cg')] + [('convnet', 'cg3', r) for r in ('gather', 'gram', 'cg')]:
            sent.clear()
            _, model = ddp_step(net, mode, rank, world, route)
            spec = check_prox_args(tau_prox=0.5, **MODES[mode])
            n, expect = N // world, 32  # 32: the check of equal batches and layer calls, once per backward
            if net == 'mlp':
                for a, b in ((20, 16), (16, 12)): expect += linear_routes(n, a, b, True, spec, world, 8)[route]['payload']
            else:
                from proxprop_nb.conv import ConvGeometry
                convs = [m for m in model.modules() if isinstance(m, ProxPropMixin)]
                shapes = [((n, 3, 8, 8), (n, 4, 8, 8)), ((n, 4, 8, 8), (n, 4, 3, 3))]
                for c, (xs, gs) in zip(convs, shapes):
                    expect += conv_routes(xs, tuple(c.weight.shape), gs, ConvGeometry.of(c), True, spec, world, 8)[route]['payload']
            out[f'bytes/{net}/{route}'] = dict(counted=sum(b for _, b in sent), formula=expect)
    finally:
        PD.dist.all_reduce, PD._all_gather_single = real_reduce, real_gather
    # 6. what cannot be global is refused, on every process, with a message that says what to do
    def refused(f):
        try: f(); return None
        except Exception as e: return f'{type(e).__name__}: {e}'
    out['refuse/unequal'] = refused(lambda: ddp_step('mlp', 'exact', rank, world, local_n=N // world - (rank == 0)))
    def no_sync():
        model, shape = make('mlp', 'exact'); d = DDP(model); X, y = data(shape)
        with d.no_sync(): F.cross_entropy(d(X[:4]), y[:4]).backward()
    out['refuse/no_sync'] = refused(no_sync)
    def join():
        model, shape = make('mlp', 'exact'); d = DDP(model); X, y = data(shape)
        with d.join(): F.cross_entropy(d(X[:4]), y[:4]).backward()
    out['refuse/join'] = refused(join)
    def forced_global_without_ddp():
        model, shape = make('mlp', 'exact'); X, y = data(shape)
        for m in model.modules():
            if isinstance(m, ProxPropMixin): m.distributed = 'global'
        F.cross_entropy(model(X), y).backward()
    out['refuse/global_without_ddp'] = refused(forced_global_without_ddp)
    def calls_differ():  # rank 0 calls its first ProxProp layer twice, the others once
        class Twice(nn.Module):
            def __init__(self, m): super().__init__(); self.m = m
            def forward(self, x, twice):
                h = self.m[0](x) + (self.m[0](x) if twice else 0)
                return self.m[4](self.m[3](self.m[2](self.m[1](h))))
        model, shape = make('mlp', 'exact'); X, y = data(shape)
        d = DDP(Twice(model))
        F.cross_entropy(d(X[:4], rank == 0), y[:4]).backward()
    out['refuse/calls_differ'] = refused(calls_differ)
    def fsdp():
        from torch.distributed.fsdp import fully_shard
        model, _ = make('mlp', 'exact'); fully_shard(model)
    out['refuse/fsdp2'] = refused(fsdp)
    dist.barrier()
    return out


if __name__ == '__main__':
    rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try: result = run(rank, world)
    except Exception: result = {'crash': traceback.format_exc()}
    with open(path, 'w') as f: json.dump(result, f, indent=1)
    exit_process_group()
