"""The committed results under nbs/results/: every record names its commit and sources (or an explained
exception), and the numbers the README quotes are the records'."""
import functools
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _importer():
    spec = importlib.util.spec_from_file_location('import_campaign', ROOT / '.ci' / 'import_campaign.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_history():
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True).returncode == 0


RECORDS = sorted(p for p in (ROOT / 'nbs' / 'results').rglob('*.json'))


def test_gpu_results_are_there():
    assert len([p for p in RECORDS if 'gpu_h200' in p.parts]) >= 20


# Provenance (issue 21): every results file says where it ran ('environment' of a run record, 'machine' of a
# benchmark), and each such record names an existing commit and that commit's source hash. No exception is left:
# the last records without one (Table 1's unproven sweep, the CPU benchmark files of unknown code) were rerun.


def where_ran(o):
    "The records of where and from which code a results file's runs ran: dicts under 'environment' or 'machine'"
    if isinstance(o, dict):
        for k, v in o.items():
            if k in ('environment', 'machine') and isinstance(v, dict): yield v
            yield from where_ran(v)
    elif isinstance(o, list):
        for v in o: yield from where_ran(v)


def _commit_exists(commit):
    found = subprocess.run(['git', 'cat-file', '-e', f'{commit}^{{commit}}'], cwd=ROOT, capture_output=True)
    return found.returncode == 0


def provenance_problems(name, record, hash_of):
    "What is wrong with the provenance of one results file (empty: nothing); `hash_of` caches commit -> source hash"
    envs, problems = list(where_ran(record)), []
    if not envs: return [f'{name}: no environment or machine record']
    for env in envs:
        if 'source_hash' not in env: problems.append(f'{name}: no source hash'); continue
        commit = env.get('git_commit') or ''
        if not commit or commit.endswith('+dirty') or not _commit_exists(commit):
            problems.append(f'{name}: commit {commit!r} is not an existing commit'); continue
        if commit not in hash_of: hash_of[commit] = _importer().source_hash_of(commit)
        if env['source_hash'] != hash_of[commit]: problems.append(f'{name}: sources are not those of {commit}')
        if 'source_hash_from' in env and not (env['source_hash_from'] == 'git archive of the recorded commit'
                                              and env.get('provenance_evidence')):
            problems.append(f'{name}: a source hash added afterwards without its evidence')
    return problems


@pytest.mark.skipif(not _has_history(), reason='needs the git history')
def test_every_record_names_its_commit_and_sources():
    hash_of, records = {}, [(p, json.loads(p.read_text())) for p in RECORDS]
    assert len(records) >= 291
    assert [m for p, r in records for m in provenance_problems(p, r, hash_of)] == []
    attributed = [p for p, r in records for e in where_ran(r) if 'source_hash_from' in e]
    assert len(attributed) >= 12  # the reduced Fig. 2 and Fig. 3 records, attributed with their evidence


@pytest.mark.skipif(not _has_history(), reason='needs the git history')
def test_provenance_check_catches_what_it_should():
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    hash_of = {}
    good = {'environment': {'git_commit': head, 'source_hash': _importer().source_hash_of(head)}}
    assert provenance_problems('good', good, hash_of) == []
    bad = [{'environment': {'git_commit': head, 'cpu': 'x'}},  # silent: no hash, no exception
           {'machine': {'cpu': 'x', 'provenance': 'from the code of the day'}},  # an exception of no known kind
           {'environment': {'git_commit': head + '+dirty', 'source_hash': hash_of[head]}},
           {'environment': {'git_commit': '0' * 40, 'source_hash': hash_of[head]}},
           {'environment': {'git_commit': head, 'source_hash': '0' * 16}},
           {'environment': {'git_commit': head, 'source_hash': hash_of[head], 'source_hash_from': 'a guess'}},
           {'machine': {'provenance': 'unknown: why'}},  # an explained exception is no longer enough
           {'rows': []}]
    for r in bad: assert provenance_problems('bad', r, hash_of), r


@pytest.mark.skipif(not _has_history(), reason='needs the git history')
def test_table1_reruns_against_the_records_they_replaced():
    "Notebook 11's account of the rerun ProxProp rows (commit 506a2c6 still holds the records they replaced)"
    old_at = lambda name: json.loads(subprocess.run(['git', 'show', f'506a2c6:nbs/results/table1/{name}'], cwd=ROOT,
                                                    capture_output=True, text=True, check=True).stdout)
    near, edge = [], []
    for p in sorted((RESULTS / 'table1').glob('*.json')):
        new = json.loads(p.read_text())
        if new['method'] == 'backprop': continue
        old = old_at(p.name)
        assert (old['status'], new['environment']['git_commit'][:7]) == (new['status'], '506a2c6'), p.name
        if new['status'] == 'finished':
            d = abs(new['final_train_loss'] / old['final_train_loss'] - 1)
            (near if new['config']['lr'] <= 1 else edge).append(d)
    assert len(near) + len(edge) == 51  # 54 runs, 3 of them diverged both times
    assert max(near) < 3e-3 and round(max(edge), 2) == 0.82  # "within 0.3%", "up to 82%"


# The README quotes numbers from the records (issue 21): each quoted fragment below is rebuilt from the records,
# so a record that changes, or a README edit that types another number, fails here.
README = (ROOT / 'README.md').read_text(encoding='utf-8')
RESULTS = ROOT / 'nbs' / 'results'


def _runs(folder):
    "(method, cg_variant) -> results record of a results folder of the paper's experiments"
    recs = [json.loads(p.read_text()) for p in sorted((RESULTS / folder).glob('*.json'))]
    return {(r['method'], r['config']['cg_variant']): r for r in recs}


def _table1(folder, variant):
    "method -> {tau: final loss or '–'} of a Table 1 results folder"
    out = {}
    for r in (json.loads(p.read_text()) for p in (RESULTS / folder).glob('*.json')):
        if r['method'] == 'backprop' or r['config']['cg_variant'] == variant:
            loss = '–' if r['status'] == 'diverged' else r['final_train_loss']
            out.setdefault(r['method'], {})[r['config']['lr']] = loss
    return out


def _pct(v): return f'{100 * v:.1f}%'
def _span(vals, fmt): return f'{fmt(min(vals))}-{fmt(max(vals))}'
def _tex(v): m, e = f'{v:.0e}'.split('e'); return f'${m}\\cdot10^{{{int(e)}}}$'  # 7e-05 -> $7\cdot10^{-5}$


def _quoted(fragment):
    assert fragment in README, f'README.md does not say {fragment!r}, which the records give'


def test_readme_gpu_fig2_numbers_are_the_records():
    run = _runs('gpu_h200/fig2')
    bp, loss = run['backprop', 'textbook'], lambda m, v: run[m, v]['final_train_loss']
    textbook = [loss(m, 'textbook') for m in ('cg3', 'cg5', 'cg10')]
    official = [loss(m, 'official') for m in ('cg3', 'cg5', 'cg10')]
    _quoted(f"final training loss BackProp {bp['final_train_loss']:.3f}, "
            f"ProxProp exact {_tex(loss('exact', 'textbook'))}, "
            f"textbook CG {_tex(min(textbook))} to {_tex(max(textbook))}, "
            f"official CG {_tex(min(official))} to {_tex(max(official))};")
    acc = lambda v: _span([run[m, v]['test_acc'] for m in ('cg3', 'cg5', 'cg10')], lambda a: f'{100 * a:.1f}')
    _quoted(f"test accuracy BackProp {_pct(bp['test_acc'])}, ProxProp {_pct(run['exact', 'textbook']['test_acc'])} "
            f"(exact), {acc('textbook')}% (textbook cg3-cg10), {acc('official')}% (official)")


def test_readme_gpu_table1_numbers_are_the_records():
    tb, of = _table1('gpu_h200/table1', 'textbook'), _table1('gpu_h200/table1', 'official')
    fmt = lambda v: f'{v:.0e}'.replace('e-0', 'e-') if v < 0.01 else f'{v:.1f}' if v >= 10 else f'{v:.3f}'
    bp = tb['backprop']
    test_taus = (0.1, 0.05, 0.005, 0.0005)
    assert [t for t, v in bp.items() if v == '–'] and all(bp[t] == '–' for t in (50, 10, 5, 1, 0.5))
    _quoted('ends at ' + ', '.join(fmt(bp[t]) for t in test_taus) + ' for τ = 0.1, 0.05, 0.005, 0.0005')
    best = min((v, t) for t, v in tb['cg3'].items() if v != '–')
    _quoted(f'best {fmt(best[0])} at τ = {best[1]:g}')
    taus = sorted(of['cg3'], reverse=True)
    _quoted("the official iteration's cg3 reproduces the paper's row: " + ', '.join(fmt(of['cg3'][t]) for t in taus))


def test_readme_gpu_fig3_numbers_are_the_records():
    run = _runs('gpu_h200/fig3')
    bp, prox = run.pop(('backprop', 'textbook')), run
    _quoted(f"training loss {bp['final_train_loss']:.3f} against "
            f"{_span([r['final_train_loss'] for r in prox.values()], lambda v: f'{v:.3f}')}; "
            f"best validation accuracy {_pct(bp['best_val_acc'])} against "
            f"{_span([r['best_val_acc'] for r in prox.values()], lambda v: f'{100 * v:.1f}')}%; "
            f"test {_pct(bp['test_acc'])} against {_pct(prox['cg3', 'official']['test_acc'])} (official cg3), "
            f"{_pct(prox['cg3', 'textbook']['test_acc'])} (textbook cg3), "
            f"{_pct(prox['cg10', 'official']['test_acc'])} (official cg10) and "
            f"{_pct(prox['cg10', 'textbook']['test_acc'])} (textbook cg10")


def test_readme_reduced_numbers_are_the_records():
    f3, pct = lambda v: f'{v:.3f}', lambda v: f'{100 * v:.1f}'
    t1 = _seed_spreads('table1', 'final_train_loss', lr=True)
    bp = {t: s for (k, t), s in t1.items() if k == 'BackProp'}
    cg3 = {t: s for (k, t), s in t1.items() if k == 'ProxProp (cg3)'}
    low = lambda row: min((s['mean'], t) for t, s in row.items() if s['mean'] is not None)[1]
    _quoted(f"lowest mean loss {_ms(cg3[low(cg3)], f3)} (textbook cg3, τ = {low(cg3):g}) against BackProp's best "
            f"{_ms(bp[low(bp)], f3)} (τ = {low(bp):g}")
    loss, acc = _seed_spreads('fig2', 'final_train_loss'), _seed_spreads('fig2', 'test_acc')
    name = lambda m: 'BackProp' if m == 'backprop' else f'ProxProp ({m})'
    _quoted(f"final training loss BackProp {_ms(loss['BackProp'], f3)}, ProxProp "
            + ', '.join(f"{m} {_ms(loss[name(m)], f3)}" for m in ('exact', 'cg10', 'cg5', 'cg3'))
            + f"; test accuracy BackProp {_ms(acc['BackProp'], pct, '%')}, ProxProp exact "
              f"{_ms(acc[name('exact')], pct, '%')} to cg3 {_ms(acc[name('cg3')], pct, '%')}")
    loss, acc = _seed_spreads('fig3', 'final_train_loss'), _seed_spreads('fig3', 'test_acc')
    f3, pct = lambda v: f'{v:.3f}', lambda v: f'{100 * v:.1f}'
    _quoted(f"training loss BackProp {_ms(loss['BackProp'], f3)}, ProxProp cg3 {_ms(loss['ProxProp (cg3)'], f3)}, "
            f"cg10 {_ms(loss['ProxProp (cg10)'], f3)}; test accuracy {_ms(acc['BackProp'], pct, '%')} against "
            f"{_ms(acc['ProxProp (cg3)'], pct, '%')} and {_ms(acc['ProxProp (cg10)'], pct, '%')}")


def _seed_spreads(exp, metric, lr=False):
    "label (and lr) -> seed spread of `metric` over the committed seed-0 runs and the seeds in results/seeds"
    from proxprop_nb.lab.experiments import load_results
    from proxprop_nb.lab.spreads import seed_spreads
    rows = load_results(RESULTS / exp) + load_results(RESULTS / 'seeds' / exp)
    keep = [s for s in seed_spreads(rows, metric) if s['cg_variant'] == 'textbook' or s['label'] == 'BackProp']
    return {(s['label'], s['lr']) if lr else s['label']: s for s in keep}


def _ms(s, fmt, unit=''):
    "mean [min, max] as the README writes it"
    return f"{fmt(s['mean'])}{unit} [{fmt(s['min'])}, {fmt(s['max'])}]"


def test_readme_comparison_numbers_are_the_records():
    "The first round (reduced protocol), which the README names in one sentence"
    from proxprop_nb.lab.compare_run import load_records
    from proxprop_nb.lab.compare_report import summarize
    records = list(load_records(RESULTS / 'compare' / 'reduced').values())
    rows = summarize(records)
    _quoted(f"{len(records)} runs on a 2-core AMD EPYC")
    _quoted(f"{sum(r['at_edge'] for r in rows)} of its {len(rows)} picks sat at an edge of their grid")


def test_readme_heldout_comparison_numbers_are_the_records():
    from proxprop_nb.lab.compare_run import load_records
    from proxprop_nb.lab.compare_report import summarize
    records = list(load_records(RESULTS / 'compare' / 'heldout').values())
    rows = {(r['network'], r['method']): r for r in summarize(records)}
    assert {r['seeds'] == [1, 2, 3] for r in rows.values()} == {True} and len(rows) == 32
    interior = sum(not r['at_edge'] for r in rows.values())
    _quoted(f"({len(records)} runs, pytorch-optimizer {records[0]['environment']['pytorch_optimizer']}; "
            f"{interior} of the {len(rows)} chosen rates are interior)")
    val = lambda n, m: _pct(rows[n, m]['val_acc'][0])
    prox, peers = ('exact-sgd', 'exact-adamw', 'cg3-sgd', 'cg3-adamw'), ('bp-sgd', 'bp-adamw', 'muon', 'soap')
    steps = lambda n, ms: _span([rows[n, m]['steps'][0] for m in ms], lambda v: f'{v:.0f}')
    for n, name in (('mlp', 'paper MLP'), ('convnet', 'paper ConvNet'), ('resnet20', 'ResNet-20'),
                    ('lm', 'transformer LM (next byte)')):
        best = max(prox, key=lambda m: rows[n, m]['val_acc'][0])
        peer = max(('bp-sgd', 'muon', 'soap'), key=lambda m: rows[n, m]['val_acc'][0])
        _quoted(f"| {name} | {val(n, best)} ({best.replace('-adamw', ' + AdamW')}) | {val(n, 'bp-adamw')} | "
                f"{rows[n, peer]['label'].split(' ')[0]} {val(n, peer)} |")
    assert min(rows['mlp', m]['val_acc'][0] for m in prox) > max(rows['mlp', m]['val_acc'][0] for m in peers)
    _quoted(f"{steps('convnet', prox)} steps in the budget against the peers' {steps('convnet', peers)}")
    _quoted(f"near chance after {steps('resnet20', prox)} steps, the peers do {steps('resnet20', peers)}")


def test_readme_long_comparison_numbers_are_the_records():
    from proxprop_nb.lab.compare_run import load_records
    from proxprop_nb.lab.compare_report import summarize
    held = list(load_records(RESULTS / 'compare' / 'heldout').values())
    long = list(load_records(RESULTS / 'compare' / 'long').values())
    rows = {(r['network'], r['method']): r for r in summarize(long + held) if r['setting'] == 'long'}
    assert len(long) == 48 and len(rows) == 16 and {r['seeds'] == [1, 2, 3] for r in rows.values()} == {True}
    _quoted(f"{len(long)} runs on the same Xeon")
    epochs = [r['steps'][0] * 500 / 45_000 for r in rows.values()]
    _quoted(f"120 s per run, {min(epochs):.1f} to {max(epochs):.1f} epochs")
    val = lambda n, m: _pct(rows[n, m]['val_acc'][0])
    prox = ('exact-sgd', 'exact-adamw', 'cg3-sgd', 'cg3-adamw')
    for n, name in (('mlp', 'paper MLP'), ('convnet', 'paper ConvNet')):
        best = max(prox, key=lambda m: rows[n, m]['val_acc'][0])
        peer = max(('bp-sgd', 'muon', 'soap'), key=lambda m: rows[n, m]['val_acc'][0])
        label = best.replace('-adamw', ' + AdamW').replace('-sgd', ' + SGD')
        _quoted(f"| {name} | {val(n, best)} ({label}) | {val(n, 'bp-adamw')} | "
                f"{rows[n, peer]['label'].split(' ')[0]} {val(n, peer)} |")


def test_readme_peer_step_costs_are_the_records():
    runs = json.loads((RESULTS / 'bench' / 'cpu_peers.json').read_text())
    names = {'mlp': 'paper MLP', 'convnet': 'paper ConvNet'}
    for r in runs:
        _quoted(f"| {names[r['model']]} | " + ' | '.join(f"{r['modes'][m]['ratio']:.2f}x" for m in
                                                          ('prox_exact', 'prox_cg3', 'bp_adamw', 'muon', 'soap')) + ' |')
    _quoted(f"commit {runs[0]['machine']['git_commit'][:7]}, median of {runs[0]['repeats']} interleaved steps")


def test_readme_benchmark_numbers_are_the_records():
    cpu = json.loads((RESULTS / 'bench' / 'cpu_main.json').read_text())
    gpu = json.loads((RESULTS / 'bench' / 'gpu_h200.json').read_text())['steps']
    gpu = [r for r in gpu if r['batch_size'] == 500]
    names = {'mlp': 'paper MLP, Nesterov SGD', 'convnet': 'paper ConvNet, Adam'}
    modes = ('gradient', 'prox_exact', 'prox_cg3', 'prox_cg10')
    for r in cpu:
        peak = max(v['memory_ratio'] for v in r['modes'].values())
        _quoted(f"| {names[r['model']]} | " + ' | '.join(f"{r['modes'][m]['ratio']:.2f}x" for m in modes)
                + f' | ≤ {peak:.2f}x |')
    for r in gpu:
        _quoted(f"| {names[r['model']]} | " + ' | '.join(f"{r['modes'][m]['ratio']:.2f}x" for m in modes) + ' |')
    plain = {r['model']: r['modes']['plain']['median_ms'] for r in gpu}
    _quoted(f"a plain backprop step takes only {plain['mlp']:.1f} ms (MLP) and {plain['convnet']:.1f} ms (ConvNet)")


@pytest.mark.skipif(not _has_history(), reason='needs the git history')
def test_attribute_adds_the_commits_hash_with_its_evidence(tmp_path):
    imp = _importer()
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    f = tmp_path / 'run.json'
    f.write_text(json.dumps({'environment': {'git_commit': head}, 'history': [{'machine': {'git_commit': head}}]}))
    assert imp.attribute(f, 'the process started after the commit, on a clean tree') == 2
    envs = list(where_ran(json.loads(f.read_text())))
    assert [e['source_hash'] for e in envs] == [imp.source_hash_of(head)] * 2
    assert provenance_problems('run', json.loads(f.read_text()), {}) == []
    assert imp.attribute(f, 'again') == 0  # a record that has a hash keeps it
    f.write_text(json.dumps({'environment': {'git_commit': head + '+dirty'}}))
    with pytest.raises(SystemExit): imp.attribute(f, 'uncommitted code is never attributed')
