"""proxprop_nb.lab.data: the lookup rules that depend on the environment (current folder, PROXPROP_DATA,
PROXPROP_CACHE, package location, network), checked on tiny fake sources in temporary folders."""
import pickle
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from proxprop_nb.lab import data, sources


def write_batches(d, n=4, seed=0):
    "A fake cifar-10-batches-py folder at `d` with `n` images per batch; returns the training images"
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    xs = rng.integers(0, 256, (6, n, 3072), dtype=np.uint8)
    for x, name in zip(xs, sources._BATCHES):
        (d/name).write_bytes(pickle.dumps({'data': x, 'labels': list(range(n))}, protocol=2))
    return xs[:5].reshape(-1, 3, 32, 32)


def test_no_data_one_clear_error(isolated):
    assert data.find_cifar10() is None
    with pytest.raises(data.Cifar10NotFoundError) as e:
        data.load_cifar10(download=False)
    msg = str(e.value)
    for part in ['download=False', 'PROXPROP_DATA', 'load_cifar10(data=PATH)', './data',
                 str(isolated/'cache'/'cifar-10-batches-py'), 'PROXPROP_CACHE', 'download=True', 'ImageFolder']:
        assert part in msg, part
    assert isinstance(e.value, FileNotFoundError)


def fake_torchvision(monkeypatch, fetch):
    "Put a stand-in torchvision whose CIFAR10(root, download=True) calls `fetch(root)`"
    def CIFAR10(root, train=True, download=False):
        assert download
        fetch(root)
    monkeypatch.setitem(sys.modules, 'torchvision', types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=CIFAR10)))


def test_failed_download_is_the_same_error(isolated, monkeypatch):
    def offline(root): raise urllib.error.URLError('Name or service not known')
    fake_torchvision(monkeypatch, offline)
    with pytest.raises(data.Cifar10NotFoundError, match='torchvision download failed: URLError') as e:
        data.load_cifar10()
    assert isinstance(e.value.__cause__, urllib.error.URLError) and 'PROXPROP_DATA' in str(e.value)


def test_download_then_cache(isolated, monkeypatch):
    fake_torchvision(monkeypatch, lambda root: write_batches(Path(root)/'cifar-10-batches-py'))
    d = data.load_cifar10(n_val=2)
    assert d.source['found_by'] == 'download' and d.source['kind'] == 'torchvision-batches'
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (18, 2, 4)
    assert list((isolated/'cache').glob('cifar10-*.npz'))  # PROXPROP_CACHE is the cache folder
    d2 = data.load_cifar10(download=False, n_val=2)
    assert d2.source['found_by'] == 'cache' and (d2.x_val == d.x_val).all()


def test_data_folder_and_precedence(isolated, monkeypatch):
    x = write_batches(isolated/'cwd'/'data'/'cifar-10-batches-py')
    d = data.load_cifar10(n_val=2)
    assert d.source['found_by'] == 'data folder'
    np.testing.assert_array_equal(d.x_val.numpy(), x[-2:])
    write_batches(isolated/'other'/'cifar-10-batches-py', seed=1)
    monkeypatch.setenv('PROXPROP_DATA', str(isolated/'other'))
    assert data.find_cifar10() == (isolated/'other'/'cifar-10-batches-py').resolve()
    assert data.find_cifar10(isolated/'cwd'/'data') == (isolated/'cwd'/'data'/'cifar-10-batches-py').resolve()
    monkeypatch.setenv('PROXPROP_DATA', str(isolated/'missing'))
    with pytest.raises(data.Cifar10NotFoundError, match=r'\$PROXPROP_DATA=.*missing does not exist'):
        data.find_cifar10()


def test_no_search_in_parent_folders(isolated, monkeypatch):
    "A shared/data folder above the current folder or the package is never looked at (anyone could have made it)"
    shared = isolated/'ci'/'shared'/'data'/'cifar-10-batches-py'
    write_batches(shared)
    (isolated/'ci'/'main'/'nbs').mkdir(parents=True)
    monkeypatch.chdir(isolated/'ci'/'main'/'nbs')  # a clone at ci/main, running a notebook in nbs/
    monkeypatch.setattr(data, '_pkg_dir', lambda: isolated/'ci'/'main'/'proxprop_nb')
    assert data.find_cifar10() is None
    monkeypatch.setenv('PROXPROP_DATA', str(shared))  # named: found
    assert data.find_cifar10() == shared.resolve()
    assert data.load_cifar10(n_val=2).source['found_by'] == 'PROXPROP_DATA'


class Payload:
    "Loaded by pickle.loads, this would create the marker folder"
    def __init__(self, marker): self.marker = marker
    def __reduce__(self):
        import os
        return (os.makedirs, (str(self.marker),))


def plant(folder, marker):
    "A cifar-10-batches-py folder whose first batch carries a payload"
    write_batches(folder)
    (folder/'data_batch_1').write_bytes(pickle.dumps({'data': Payload(marker), 'labels': [0]}, protocol=2))


def test_planted_payload_never_runs(isolated, monkeypatch):
    marker = isolated/'payload-ran'
    plant(isolated/'cwd'/'data'/'cifar-10-batches-py', marker)  # found by the default lookup (./data)
    with pytest.raises(ValueError, match=r'data_batch_1: not a readable CIFAR-10 python batch.*refers to os.makedirs'):
        data.load_cifar10(download=False)
    plant(isolated/'explicit'/'cifar-10-batches-py', marker)  # named explicitly, as a folder
    with pytest.raises(ValueError, match='refused, not run'):
        data.load_cifar10(isolated/'explicit', download=False)
    import tarfile
    with tarfile.open(isolated/'evil.tar.gz', 'w:gz') as t:  # and as an archive
        t.add(isolated/'explicit'/'cifar-10-batches-py', arcname='cifar-10-batches-py')
    with pytest.raises(ValueError, match='refers to os.makedirs'):
        data.load_cifar10(isolated/'evil.tar.gz', download=False)
    assert not marker.exists()


def test_original_release_is_recognised_by_md5(isolated, monkeypatch):
    d = isolated/'b'/'cifar-10-batches-py'
    write_batches(d)
    assert data.load_cifar10(d.parent, n_val=2).source['original_release'] is False
    sums = {f: sources.hashlib.md5((d/f).read_bytes()).hexdigest() for f in sources._BATCHES}
    (d/'batches.meta').write_bytes(pickle.dumps({'label_names': list(sources.CIFAR10_CLASSES)}, protocol=2))
    sums['batches.meta'] = sources.hashlib.md5((d/'batches.meta').read_bytes()).hexdigest()
    monkeypatch.setattr(sources, '_CIFAR_MD5', sums)  # pretend these are the original files
    assert sources._original_release(sources._file_reader(d)) is True


def test_repo_data_folder(isolated, monkeypatch):
    repo = isolated/'repo'
    (repo/'proxprop_nb').mkdir(parents=True)
    monkeypatch.setattr(data, '_pkg_dir', lambda: repo/'proxprop_nb')
    write_batches(repo/'data'/'cifar-10-batches-py')
    assert data.find_cifar10() is None  # not a source checkout: no settings.ini
    (repo/'settings.ini').write_text('[DEFAULT]\n')
    assert data.find_cifar10() == (repo/'data'/'cifar-10-batches-py').resolve()
