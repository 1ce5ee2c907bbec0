"""The data side of the hardening issues (23: items 2, 5, 6, 7, 8; 22: the first hour's data messages).

Each test is a case a careful user could meet, on tiny fake sources in temporary folders; each failed on the
code before the change it checks. The data chapter's fault table (nbs/03_data.ipynb) lists what they get."""
import gzip
import io
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proxprop_nb.lab import sources
from proxprop_nb.lab.data import Cifar10NotFoundError, load_cifar10
from proxprop_nb.lab.runfiles import data_identity, differences
from proxprop_nb.lab.sources import fake_batches, fake_imagefolder, make_tar

REPO = Path(__file__).resolve().parent.parent


def cache_file(src, cache):
    "The one cache file that `load_cifar10(src)` wrote into `cache`"
    files = [f for f in Path(cache).glob('cifar10-*.npz') if not f.is_symlink()]
    assert len(files) == 1, files
    return files[0]


def rewrite_meta(f, meta_text):
    "Rewrite cache file `f` with its arrays and `meta_text` as its meta"
    with np.load(f) as z: arrays = {k: z[k] for k in z.files if k != 'meta'}
    np.savez(f, meta=np.array(meta_text), **arrays)


def dead_pid():
    "The pid of a process that has ended"
    return int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                              text=True).stdout)


# ---- 23.2: no file written through a planted link ----------------------------------------------------------

def test_planted_link_at_the_cache_part_name_is_not_followed(isolated):
    fake_batches(isolated/'b')
    key = load_cifar10(isolated/'b', cache_dir=isolated/'probe', n_val=6).source['fingerprint']
    victim = isolated/'victim.txt'
    victim.write_text('precious')
    (isolated/'cache').mkdir()
    (isolated/'cache'/f'cifar10-{key}.npz.part-{os.getpid()}').symlink_to(victim)  # the predictable name
    d = load_cifar10(isolated/'b', cache_dir=isolated/'cache', n_val=6)
    assert victim.read_text() == 'precious'  # neither truncated nor overwritten
    f = isolated/'cache'/f'cifar10-{key}.npz'
    assert f.is_file() and not f.is_symlink() and len(d.x_train) == 54  # and the cache was still written


# ---- 23.5: a cache keyed and verified by content -----------------------------------------------------------

def test_cache_file_copied_under_another_key_is_not_served(isolated):
    ref_a, ref_b = fake_batches(isolated/'a', seed=1), fake_batches(isolated/'b', seed=2)
    load_cifar10(isolated/'a', cache_dir=isolated/'ca', n_val=6)
    load_cifar10(isolated/'b', cache_dir=isolated/'cb', n_val=6)
    a_file, b_file = cache_file(isolated/'a', isolated/'ca'), cache_file(isolated/'b', isolated/'cb')
    shutil.copy(a_file, b_file)  # a's cache file under b's key
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        d = load_cifar10(isolated/'b', cache_dir=isolated/'cb', n_val=6)
    np.testing.assert_array_equal(d.x_test.numpy(), ref_b['test'][0])
    assert not np.array_equal(ref_a['test'][0], ref_b['test'][0])


def test_relabelled_batches_with_the_same_size_and_mtime_are_decoded_again(isolated):
    fake_batches(isolated/'b')
    load_cifar10(isolated/'b', n_val=6)
    f = isolated/'b'/'cifar-10-batches-py'/'data_batch_1'
    st = f.stat()
    with open(f, 'rb') as fh: batch = pickle.load(fh)  # our own fake file
    batch['labels'] = [(y + 1) % 10 for y in batch['labels']]
    f.write_bytes(pickle.dumps(batch, protocol=2))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    d = load_cifar10(isolated/'b', n_val=6)
    assert d.y_train[:12].tolist() == batch['labels']


def test_cache_kind_is_not_believed(isolated):
    ref = fake_batches(isolated/'b')
    d = load_cifar10(isolated/'b', n_val=6)
    f = cache_file(isolated/'b', isolated/'cache')
    rewrite_meta(f, str(np.load(f)['meta']).replace('"torchvision-batches"', '"imagefolder"'))
    with pytest.warns(UserWarning, match=f"{f.name}.*kind 'imagefolder'"):
        d2 = load_cifar10(isolated/'b', n_val=6)
    assert d2.source['kind'] == 'torchvision-batches'
    np.testing.assert_array_equal(d2.x_val.numpy(), ref['train'][0][-6:])  # the last 6 in order: not shuffled
    assert (d2.x_val == d.x_val).all()


@pytest.mark.parametrize('meta', ['[1, 2]', '{}', 'not json', '{"kind": 5}', '"just a string"'])
def test_malformed_cache_meta_gets_one_line_and_a_fresh_decode(isolated, meta):
    ref = fake_imagefolder(isolated/'imgs')
    load_cifar10(isolated/'imgs', n_val=20)
    f = cache_file(isolated/'imgs', isolated/'cache')
    rewrite_meta(f, meta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        d = load_cifar10(isolated/'imgs', n_val=20)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and str(f) in said[0] and '\n' not in said[0], said
    np.testing.assert_array_equal(d.x_test.numpy(), ref['test'][0])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_cifar10(isolated/'imgs', n_val=20)  # replaced: the next load is quiet


@pytest.mark.parametrize('layout', ['imagefolder', 'batches', 'archive'])
def test_byte_identical_copy_at_another_path_is_the_same_data(isolated, layout, capfd):
    if layout == 'imagefolder': fake_imagefolder(src := isolated/'imgs')
    elif layout == 'batches': fake_batches(isolated/'b'); src = isolated/'b'/'cifar-10-batches-py'
    else: fake_imagefolder(isolated/'imgs'); src = make_tar(isolated/'imgs', isolated/'imgs.tar.gz')
    copy = isolated/'elsewhere'/src.name
    copy.parent.mkdir()
    (shutil.copytree if src.is_dir() else shutil.copy)(src, copy)
    a = load_cifar10(src, n_val=6)
    capfd.readouterr()
    b = load_cifar10(copy, n_val=6)
    assert differences(data_identity(a.source), data_identity(b.source)) == {}
    assert a.source['path'] != b.source['path']
    assert 'decoding' not in capfd.readouterr().err  # and the copy is served from the same cache file


# ---- 23.6: an unusable cache folder is a warning, and the load works without a cache -----------------------

def test_cache_folder_that_is_a_file_warns(isolated, monkeypatch):
    ref = fake_batches(isolated/'b')
    (isolated/'not-a-folder').write_text('mine')
    monkeypatch.setenv('PROXPROP_CACHE', str(isolated/'not-a-folder'))
    with pytest.warns(UserWarning, match='could not cache') as caught:
        d = load_cifar10(isolated/'b', n_val=6)
    assert str(isolated/'not-a-folder') in str(caught[0].message) and '\n' not in str(caught[0].message)
    np.testing.assert_array_equal(d.x_test.numpy(), ref['test'][0])
    assert (isolated/'not-a-folder').read_text() == 'mine'


def mount_read_only(folder):
    "A shell command that mounts `folder` over itself, read-only (in a private mount namespace: see unshare)"
    return f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder}'


def read_only_mounts(folder):
    "Whether `folder` can be mounted read-only in a private mount namespace (root, util-linux unshare)"
    if not shutil.which('unshare'): return False
    probe = f'{mount_read_only(folder)} && ! touch {folder}/x'
    return subprocess.run(['unshare', '-m', 'sh', '-c', probe], capture_output=True).returncode == 0


def test_read_only_cache_folder_warns(isolated):
    fake_batches(isolated/'b')
    ro = isolated/'ro-cache'
    ro.mkdir()
    (ro/f'cifar10-0123456789abcdef.npz.part-{dead_pid()}').write_bytes(b'a killed writer left this')
    if not read_only_mounts(ro): pytest.skip('no read-only mount here (needs root and unshare)')
    code = textwrap.dedent(f"""
        import warnings; warnings.simplefilter('always')
        from proxprop_nb.lab.data import load_cifar10
        d = load_cifar10({str(isolated/'b')!r}, cache_dir={str(ro)!r}, n_val=6)
        print('loaded', len(d.x_train))""")
    in_read_only_cache = f'{mount_read_only(ro)} && exec "$0" -c "$1"'
    r = subprocess.run(['unshare', '-m', 'sh', '-c', in_read_only_cache, sys.executable, code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr
    assert 'loaded 54' in r.stdout and 'could not cache' in r.stderr and 'Read-only file system' in r.stderr


# ---- 23.7: bounds ------------------------------------------------------------------------------------------

def shared_lists(shape):
    "Nested lists of zeros of `shape`, each level one list named again and again: tiny pickles, many numbers"
    nested = 0
    for n in reversed(shape): nested = [nested] * n
    return nested


@pytest.mark.parametrize('shape', [(16,) * 8, (4096, 1024, 1024)], ids=['deep', 'wide'])
def test_nested_pickle_with_shared_references_is_refused_before_numpy(isolated, shape):
    "4.3e9 numbers (34 GB as int64) in a pickle of 1 to 12 kB; the load runs in a child, which must end soon"
    d = isolated/'b'/'cifar-10-batches-py'
    fake_batches(isolated/'b')
    (d/'data_batch_1').write_bytes(pickle.dumps({'data': shared_lists(shape), 'labels': [0]}, protocol=2))
    assert (d/'data_batch_1').stat().st_size < 12_500
    code = textwrap.dedent(f"""
        import resource
        from proxprop_nb.lab.data import load_cifar10
        try: load_cifar10({str(d)!r}, cache_dir={str(isolated/'cache')!r})
        except ValueError as e: print('refused:', e)
        print('max MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)""")
    try: r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired: pytest.fail('still walking the nested lists after 90 s')
    assert re.search(r'refused: .*data_batch_1: its objects nest more than 4 levels deep or hold more than '
                     r'1,048,576 items', r.stdout), r.stdout + r.stderr
    assert int(r.stdout.split('max MB')[1]) < 2000


@pytest.mark.parametrize('layout', ['imagefolder', 'batches'])
def test_oversized_file_in_a_folder_source_is_refused_before_reading(isolated, layout):
    if layout == 'imagefolder': fake_imagefolder(src := isolated/'imgs'); big = src/'train'/'cat'/'0000.png'
    else: fake_batches(isolated/'b'); src = isolated/'b'/'cifar-10-batches-py'; big = src/'data_batch_3'
    with open(big, 'r+b') as f: f.truncate(300 * 2**20)  # sparse: 300 MB that take no disk space
    with pytest.raises(ValueError, match=f"{big.name} has 314,572,800 bytes, more than a CIFAR-10 file ever"):
        load_cifar10(src, download=False)


def gz_tar(dest, members):
    "A .tar.gz of (TarInfo, data) pairs, written as given: a header may claim more bytes than follow it"
    raw = io.BytesIO()
    for info, data in members:
        raw.write(info.tobuf(tarfile.GNU_FORMAT) if info.type != tarfile.XHDTYPE else data)
        if info.type != tarfile.XHDTYPE: raw.write(data + bytes(-len(data) % 512))
    raw.write(bytes(1024))
    Path(dest).write_bytes(gzip.compress(raw.getvalue(), 1))
    return Path(dest)


def pax_header(size):
    "A pax extended header block that claims `size` bytes of records"
    info = tarfile.TarInfo('././@PaxHeader'); info.type, info.size = tarfile.XHDTYPE, size
    return info, info.tobuf(tarfile.USTAR_FORMAT) + b'30 comment=' + bytes(19) + b'\n'


def huge(name, size):
    info = tarfile.TarInfo(name); info.size = size
    return info, b'\0' * 4096  # the header claims `size`; the archive ends long before


@pytest.mark.parametrize('claim', ['member', 'pax'])
def test_archive_members_claiming_gigabytes_are_refused_from_the_header(isolated, claim):
    big = huge('junk/zeros.bin', 4 * 2**30) if claim == 'member' else pax_header(2 * 2**30)
    tgz = gz_tar(isolated/'huge.tar.gz', [big])
    with pytest.raises(ValueError, match='more than 1,073,741,824 bytes'):
        load_cifar10(tgz, download=False)


def test_skipped_archive_bytes_count_towards_the_bound(isolated, monkeypatch):
    fake_imagefolder(isolated/'imgs')
    (isolated/'imgs'/'notes.bin').write_bytes(bytes(2 * 10**6))  # not an image: skipped, but read through
    tgz = make_tar(isolated/'imgs', isolated/'imgs.tar.gz')
    monkeypatch.setattr(sources, '_MAX_ARCHIVE_BYTES', 10**6)  # the images alone are ~0.4 MB
    with pytest.raises(ValueError, match='more than 1,000,000 bytes'):
        load_cifar10(tgz, download=False)


def test_the_number_of_archive_members_is_bounded(isolated, monkeypatch):
    fake_imagefolder(isolated/'imgs')  # 100 images and 22 folders
    tgz = make_tar(isolated/'imgs', isolated/'imgs.tar.gz')
    monkeypatch.setattr(sources, '_MAX_MEMBERS', 50, raising=False)
    with pytest.raises(ValueError, match='more than 50 members'):
        load_cifar10(tgz, download=False)


# ---- 23.8: the unclear ones --------------------------------------------------------------------------------

def test_protocol_5_batches_are_accepted(isolated):
    ref = fake_batches(isolated/'b')
    d = isolated/'b'/'cifar-10-batches-py'
    for f in d.iterdir():
        with open(f, 'rb') as fh: content = pickle.load(fh)  # our own fake files
        f.write_bytes(pickle.dumps(content, protocol=5))
    got = load_cifar10(d, download=False, n_val=6)
    np.testing.assert_array_equal(got.x_test.numpy(), ref['test'][0])


def png16(arr):
    "A PNG of 16 bits per channel: grey for an (H, W) array, RGB for (H, W, 3)"
    h, w = arr.shape[:2]
    rows = b''.join(b'\x00' + arr[i].astype('>u2').tobytes() for i in range(h))
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    ihdr = struct.pack('>IIBBBBB', w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(rows))
            + chunk(b'IEND', b''))


@pytest.mark.parametrize('shape', [(32, 32, 3), (32, 32)], ids=['48-bit RGB', '16-bit grey'])
def test_high_bit_depth_images_are_refused_alike(isolated, shape):
    fake_imagefolder(isolated/'imgs')
    deep = isolated/'imgs'/'train'/'cat'/'0003.png'
    deep.write_bytes(png16(np.full(shape, 0x1234, np.uint16)))
    with pytest.raises(ValueError, match='0003.png: .*16 bits per channel; CIFAR-10 images have 8'):
        load_cifar10(isolated/'imgs', download=False)


@pytest.mark.parametrize('what', ['fifo', 'device', 'dangling', 'folder'])
def test_special_files_are_named_for_what_they_are(isolated, what):
    fake_imagefolder(isolated/'imgs')
    f = isolated/'imgs'/'train'/'cat'/'0003.png'
    f.unlink()
    if what == 'fifo': os.mkfifo(f)
    elif what == 'device': f.symlink_to('/dev/zero')
    elif what == 'dangling': f.symlink_to(isolated/'gone.png')
    else: f.mkdir()
    said = {'fifo': 'is a FIFO', 'device': 'is a character device', 'folder': 'is a folder',
            'dangling': f"is a symbolic link to {isolated/'gone.png'}, which does not exist"}[what]
    with pytest.raises(ValueError, match=re.escape(f"0003.png {said}")):
        load_cifar10(isolated/'imgs', download=False)


# ---- 22: the first hour ------------------------------------------------------------------------------------

def test_no_data_message_serves_the_command_line_and_python(isolated, monkeypatch):
    monkeypatch.setattr('proxprop_nb.lab.data._data_dirs', lambda: [isolated/'cwd'/'data'])
    with pytest.raises(Cifar10NotFoundError) as e:
        load_cifar10(download=False)
    assert '--data PATH' in str(e.value) and 'load_cifar10(data=PATH)' in str(e.value)


BROKEN_TORCHVISION = "raise RuntimeError('operator torchvision::nms does not exist')\n"


def test_broken_torchvision_is_named_with_the_fix(isolated, monkeypatch):
    (isolated/'site'/'torchvision').mkdir(parents=True)
    (isolated/'site'/'torchvision'/'__init__.py').write_text(BROKEN_TORCHVISION)
    monkeypatch.syspath_prepend(str(isolated/'site'))
    monkeypatch.delitem(sys.modules, 'torchvision', raising=False)
    monkeypatch.setattr('proxprop_nb.lab.data._data_dirs', lambda: [isolated/'cwd'/'data'])
    said = 'torchvision .*cannot be imported with torch .*operator torchvision::nms does not exist'
    with pytest.raises(Cifar10NotFoundError, match=said) as e:
        load_cifar10()
    assert 'matching' in str(e.value) and 'pip install' in str(e.value) and '--data PATH' in str(e.value)


def test_missing_torchvision_is_named_with_the_fix(isolated, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torchvision', None)  # as if it were not installed
    monkeypatch.setattr('proxprop_nb.lab.data._data_dirs', lambda: [isolated/'cwd'/'data'])
    with pytest.raises(Cifar10NotFoundError, match='the download needs torchvision, which is not installed: '
                                                   'pip install torch==.* torchvision'):
        load_cifar10()


def test_demo_with_broken_torchvision_and_no_data_ends_in_a_message(isolated):
    (isolated/'site'/'torchvision').mkdir(parents=True)
    (isolated/'site'/'torchvision'/'__init__.py').write_text(BROKEN_TORCHVISION)
    paths = [str(isolated/'site')] + [os.environ['PYTHONPATH']] * bool(os.environ.get('PYTHONPATH'))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(paths), 'PROXPROP_CACHE': str(isolated/'cache')}
    env.pop('PROXPROP_DATA', None)
    code = ('import sys; from proxprop_nb.lab.campaign import experiment_command; '
            f"sys.exit(experiment_command(['demo', '--out', {str(isolated/'out')!r}]))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=isolated/'cwd', timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'torchvision' in r.stderr and 'pip install' in r.stderr and '--data PATH' in r.stderr
