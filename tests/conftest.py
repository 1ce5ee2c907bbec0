"""Fixtures shared by the unit tests (the notebook runner lives in the repository's top-level conftest.py)."""
import pytest
import torch

from proxprop_nb.lab import data
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


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    "No data but what a test writes: empty current folder, no PROXPROP_DATA, a private cache, the package elsewhere"
    (tmp_path/'cwd').mkdir()
    monkeypatch.chdir(tmp_path/'cwd')
    monkeypatch.delenv('PROXPROP_DATA', raising=False)
    monkeypatch.setenv('PROXPROP_CACHE', str(tmp_path/'cache'))
    monkeypatch.setattr(data, '_pkg_dir', lambda: tmp_path/'site'/'proxprop_nb')
    return tmp_path
