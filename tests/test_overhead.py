"The host-side cost of a ProxProp layer: what its Python and its operator count add to a step (chapter 20)"
import inspect

import pytest
import torch
import torch.nn.functional as F

from proxprop_nb import ProxPropLinear, ProxPropConv2d
from proxprop_nb.conv import _corners_batched
from proxprop_nb.lab.bench import top_level_ops


class _WithSetupContext(torch.autograd.Function):
    "A Function in the setup_context style: the control, to show the probe sees what it looks for"
    @staticmethod
    def forward(x): return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output): pass

    @staticmethod
    def backward(ctx, g): return g * 2


def _signature_calls(monkeypatch, f) -> int:
    "How often one call of f asks inspect.signature (torch binds a setup_context Function's arguments so)"
    calls, signature = [0], inspect.signature
    def counted(*args, **kwargs):
        calls[0] += 1
        return signature(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(inspect, 'signature', counted)
        f()
    return calls[0]


@pytest.mark.parametrize('mode', ['gradient', 'prox_exact', 'prox_cg3'])
def test_a_prox_layer_binds_no_signature_per_call(monkeypatch, mode):
    # `Function.apply` of a setup_context Function costs about 50 us of signature binding per call
    x = torch.randn(4, 3, requires_grad=True)
    if _signature_calls(monkeypatch, lambda: _WithSetupContext.apply(x)) == 0:
        pytest.skip('this torch binds no signature in Function.apply: nothing to avoid')
    lin = ProxPropLinear(3, 2, optimization_mode=mode)
    conv = ProxPropConv2d(2, 2, 3, padding=1, optimization_mode=mode)
    step = lambda: conv(lin(x).view(1, 2, 2, 2)).sum().backward()
    step()
    assert _signature_calls(monkeypatch, step) == 0


def test_the_corner_correlations_are_one_batched_product_on_a_gpu():
    # the patch Gram's corner corrections on a GPU: a fixed number of operators, however many corner positions
    # (the CPU's loop over the positions costs about nine operators each, 16 positions per 5x5 convolution)
    gen = torch.Generator().manual_seed(0)
    x, d, K2 = torch.randn(3, 2, 8, 8, generator=gen), 1, 5
    e = d * (3 - 1); xe = F.pad(x, (e, e, e, e))
    few = top_level_ops(lambda: _corners_batched(x, xe, [0, 7], [0, 7], e, K2, d))
    many = top_level_ops(lambda: _corners_batched(x, xe, [0, 1, 6, 7], [0, 1, 2, 5, 6, 7], e, K2, d))
    assert few == many <= 6, (few, many)


def test_the_corners_are_batched_off_the_cpu_and_looped_on_it(monkeypatch):
    import proxprop_nb.conv as conv
    seen = []
    monkeypatch.setattr(conv, '_corners_batched', lambda *args: seen.append('batched'))
    monkeypatch.setattr(conv, '_corners_looped', lambda *args: seen.append('looped'))
    for device in ('cpu', 'meta'):  # 'meta' stands in for a GPU: any device but the CPU
        conv._corners(torch.zeros(1, 1, 4, 4, device=device), None, [0], [0], 1, 3, 1)
    assert seen == ['looped', 'batched']


def _gram_operators(monkeypatch, N, device_type):
    "Operators of the patch Gram of the paper's second ConvNet layer at batch N, chunked and cornered as there"
    import functools
    import proxprop_nb.conv as conv
    monkeypatch.setattr(conv, '_batched_corners', lambda device: device_type != 'cpu')
    monkeypatch.setattr(conv, '_chunk_samples', functools.partial(conv._chunk_samples, device_type=device_type))
    geo = conv.ConvGeometry.of(torch.nn.Conv2d(16, 20, 5, padding=2))
    x = torch.randn(N, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    return top_level_ops(lambda: conv.conv_gram(x, (5, 5), geo))


def test_a_gpu_forms_the_paper_convnets_patch_grams_in_one_chunk(monkeypatch):
    # on a GPU every chunk's operators are kernel launches: under its budget (and its batched corners) a paper
    # ConvNet layer's patch Gram costs as many operators at batch 500 as at batch 50; the code before chunked by
    # 2**19 input elements there too, 4 chunks for this layer at batch 500
    assert _gram_operators(monkeypatch, 500, 'cuda') == _gram_operators(monkeypatch, 50, 'cuda')


def test_the_cpu_chunks_a_large_batch(monkeypatch):
    # the control: the CPU keeps chunks of 2**19 input elements, so the same layer takes more operators at 500
    assert _gram_operators(monkeypatch, 500, 'cpu') > _gram_operators(monkeypatch, 50, 'cpu')
