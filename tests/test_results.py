"""The committed results under nbs/results/: every record that carries a source hash provably comes from its commit."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _importer():
    spec = importlib.util.spec_from_file_location('import_campaign', ROOT / '.ci' / 'import_campaign.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def environments(o):
    "Every environment record (a dict with git_commit and source_hash) inside a JSON value"
    if isinstance(o, dict):
        if 'git_commit' in o and 'source_hash' in o: yield o
        for v in o.values(): yield from environments(v)
    elif isinstance(o, list):
        for v in o: yield from environments(v)


def _has_history():
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True).returncode == 0


RECORDS = sorted(p for p in (ROOT / 'nbs' / 'results').rglob('*.json'))


def test_gpu_results_are_there():
    assert len([p for p in RECORDS if 'gpu_h200' in p.parts]) >= 20


@pytest.mark.skipif(not _has_history(), reason='needs the git history')
def test_records_with_a_source_hash_come_from_their_commit():
    hash_of, checked = {}, 0
    imp = _importer()
    for p in RECORDS:
        for env in environments(json.loads(p.read_text())):
            commit = env['git_commit']
            assert commit and not commit.endswith('+dirty'), f'{p}: git_commit {commit!r}'
            if commit not in hash_of: hash_of[commit] = imp.source_hash_of(commit)
            assert env['source_hash'] == hash_of[commit], f'{p}: sources {env["source_hash"]} are not those of {commit}'
            checked += 1
    assert checked >= 26
