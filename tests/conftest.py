"""Fixtures shared by the unit tests (the notebook runner lives in the repository's top-level conftest.py)."""
import pytest
import torch

from proxprop_nb.lab.train import synthetic_cifar10


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Toy models are dominated by threading overhead on a shared 2-core machine: one torch thread per test module"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def toy():
    "A learnable random stand-in for CIFAR-10: 64 training images of 3x8x8, 32 validation and test images"
    return synthetic_cifar10(64, 32, 32)
