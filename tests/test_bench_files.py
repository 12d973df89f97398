"""The file-writing benchmark's machinery (its timings belong in bench/results/files.md, never in tests)."""


def test_files_bench_times_both_ways_and_writes_its_table(monkeypatch, tmp_path):
    from bench import files
    monkeypatch.setattr(files, 'RESULTS', tmp_path)
    monkeypatch.setenv('MINIAI_BENCH_DIR', str(tmp_path))
    md = files.main(['--rounds', '1', '--n', '20'])
    rows = [l for l in md.splitlines() if l.startswith('| small') or l.startswith('| checkpoint')]
    assert len(rows) == 2 and all(l.endswith('x |') and ' ms | ' in l for l in rows)
    assert (tmp_path / 'files.md').read_text().startswith('# Writing files safely')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['files.md'], 'the written files are cleaned up'
