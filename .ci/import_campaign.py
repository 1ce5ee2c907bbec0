#!/usr/bin/env python
"""Import the files of a GPU campaign (`proxprop-experiment campaign --out OUT`) into nbs/results/, with checked provenance.

    python .ci/import_campaign.py OUT --commit SHA --name gpu_h200 [--record campaign] [--bench gpu_h200] [--extra FILE ...]

The campaign runs in a copy of the checkout on another machine. Its records name the code by the commit it was given
(or that git reported there) and by `source_hash`, a hash of the package sources. This script:

1. recomputes the source hash of commit SHA from git (`git archive SHA proxprop_nb`) and refuses to import unless
   every record's `source_hash` equals it: the records then provably come from that commit;
2. writes `environment.git_commit = SHA` and `commit_from = 'source_hash'` into every record, keeping what the
   remote machine reported in `git_reported` (a stale `.git` in the copy reported another commit, `+dirty`);
3. unpacks results.tar.gz into nbs/results/<name>/<experiment>/, copies bench.json to
   nbs/results/bench/<bench>.json, and the campaign's record, logs and summary to nbs/results/<name>/<record>/
   (summary.txt rewritten from the corrected record).

A campaign that continues an earlier one gets that one's results files in its work folder (so it skips those runs)
and packs them again: a file identical to the one already imported is skipped; nothing imported is overwritten.

`attribute(path, evidence)` gives a results file written before records carried a source hash the hash of its
recorded commit, with `source_hash_from` and the evidence that the code which ran was that commit's (issue 21).
"""
import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_hash_of(commit: str) -> str:
    "The `proxprop_nb.lab.runfiles.source_hash` of the package sources at `commit`, from git"
    data = subprocess.run(['git', 'archive', commit, 'proxprop_nb'], cwd=ROOT, capture_output=True, check=True).stdout
    h = hashlib.sha256()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:  # every .py under proxprop_nb/, by its path below it
        files = sorted((m for m in t.getmembers() if m.isfile() and m.name.endswith('.py')),
                       key=lambda m: m.name.split('/', 1)[1])
        for m in files: h.update(m.name.split('/', 1)[1].encode() + b'\0' + t.extractfile(m).read() + b'\0')
    return h.hexdigest()[:16]


def attribute(path: Path, evidence: str) -> int:
    "Add `source_hash_of(git_commit)` to every environment record of results file `path` that has none; the count"
    text = path.read_text()
    r, n = json.loads(text), 0

    def add(env):
        nonlocal n
        commit = env.get('git_commit') or ''
        if 'source_hash' in env or not commit: return
        if commit.endswith('+dirty'): sys.exit(f'{path}: {commit} is not committed code; not attributed')
        env.update(source_hash=source_hash_of(commit), source_hash_from='git archive of the recorded commit',
                   provenance_evidence=evidence)
        n += 1

    def walk(o):
        if isinstance(o, dict):
            if 'git_commit' in o: add(o)
            for v in o.values(): walk(v)
        elif isinstance(o, list):
            for v in o: walk(v)
    walk(r)
    path.write_text(json.dumps(r, indent=1, allow_nan=False) + ('\n' if text.endswith('\n') else ''))
    return n


def fix_env(env: dict, commit: str, expected: str, where: str) -> dict:
    if env.get('source_hash') != expected:
        sys.exit(f'{where}: source_hash {env.get("source_hash")} is not the hash {expected} of commit {commit}; not imported')
    reported = env.get('git_commit')
    env = dict(env, git_commit=commit, commit_from='source_hash')
    if reported != commit: env['git_reported'] = reported
    return env


def fix_all(o, commit: str, expected: str, where: str):
    "`o` with every environment record inside it (a dict with git_commit and source_hash) fixed by `fix_env`"
    if isinstance(o, dict):
        o = {k: fix_all(v, commit, expected, where) for k, v in o.items()}
        return fix_env(o, commit, expected, where) if 'git_commit' in o and 'source_hash' in o else o
    if isinstance(o, list): return [fix_all(v, commit, expected, where) for v in o]
    return o


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out', type=Path, help="the campaign's --out folder, as fetched")
    p.add_argument('--commit', required=True, help='the commit the campaign ran (its full sha)')
    p.add_argument('--name', required=True, help='folder name under nbs/results/, e.g. gpu_h200')
    p.add_argument('--record', default='campaign', help="folder name under nbs/results/NAME/ for the campaign's record")
    p.add_argument('--bench', help='name of the benchmark file under nbs/results/bench/ (default: NAME)')
    p.add_argument('--extra', nargs='*', default=[], type=Path, help='more files to keep with the campaign record')
    a = p.parse_args(argv)
    commit = subprocess.run(['git', 'rev-parse', a.commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    expected = source_hash_of(commit)
    dest = ROOT / 'nbs' / 'results' / a.name
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.out / 'results.tar.gz') as t:
            t.extractall(tmp, filter='data')
        runs, known = [], 0
        for f in sorted(Path(tmp).glob('*/*.json')):
            r = json.loads(f.read_text())
            target = dest / f.parent.name / f.name
            if target.exists():
                old = json.loads(target.read_text())
                try: again = old == fix_all(r, commit, expected, f.name)  # this campaign's file, imported before
                except SystemExit: again = False
                if old == r or again: known += 1; continue  # imported before (an earlier campaign's file carried along)
                sys.exit(f'{target} exists and differs from the campaign\'s {f.parent.name}/{f.name}: not overwritten')
            runs.append(f)
            r = fix_all(r, commit, expected, f.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(r, indent=1, allow_nan=False) + '\n')
    rec = json.loads((a.out / 'campaign.json').read_text())
    rec = fix_all(rec, commit, expected, 'campaign.json')
    camp = dest / a.record
    camp.mkdir(parents=True, exist_ok=True)
    (camp / 'campaign.json').write_text(json.dumps(rec, indent=1, allow_nan=False) + '\n')
    bench = json.loads((a.out / 'bench.json').read_text())
    bench = fix_all(bench, commit, expected, 'bench.json')
    (ROOT / 'nbs' / 'results' / 'bench' / f'{a.bench or a.name}.json').write_text(json.dumps(bench, indent=1, allow_nan=False) + '\n')
    for name in ('campaign.log', 'tests.log', *[str(e) for e in a.extra]):
        src = Path(name) if Path(name).is_absolute() else a.out / name
        if name == 'tests.log' and not src.exists():  # the test outcome is in campaign.json too
            print(f'note: {src} was not fetched; the tests stage outcome stays in campaign.json'); continue
        shutil.copy(src, camp / src.name)
    sys.path.insert(0, str(ROOT))
    from proxprop_nb.lab.stages import summary_text
    (camp / 'summary.txt').write_text(summary_text(rec, dest) + '\n')
    print(f'imported {len(runs)} results files ({known} imported before skipped) of commit {commit[:12]} (sources {expected}) into {dest}')


if __name__ == '__main__':
    main()
