"""bench.fid's machinery on small features (its timings belong in bench/results, never in tests)."""
import importlib.util

from miniai.fid import _calc_fid, _calc_stats


def test_the_reference_is_the_fid_of_its_features():
    "The bench's reference (QR + singular values, from the features) against miniai's FID, full rank and not."
    from bench.fid import features, reference_fid
    x, y = features(300, 16, 1.0, 0., seed=1), features(300, 16, 0.8, 0.01, seed=2)
    for n in (300, 10):
        want = _calc_fid(*_calc_stats(x[:n]), *_calc_stats(y[:n]))
        assert abs(reference_fid(x[:n], y[:n]) - want) <= 1e-6 * want
    assert features(5, 4, 1., 0., seed=3).equal(features(5, 4, 1., 0., seed=3)), 'seeded'


def test_fid_bench_writes_its_table(tmp_path):
    from bench import fid
    out = tmp_path / 'fid.md'
    fid.main(['--n', '400', '--d', '24', '--few', '16', '--rounds', '1', '--out', str(out)])
    md = out.read_text()
    assert md.startswith('### FID of two sets of 400 x 24 features (float64), and of their first 16')
    rows = {r.split(' | ')[0].lstrip('| '): r.split(' | ') for r in md.splitlines() if r.startswith('| ') and '---' not in r}
    has_scipy = importlib.util.find_spec('scipy') is not None
    want = ['method', 'miniai `_calc_fid` (eigh, symmetric, float64)',
            *(['course: `scipy.linalg.sqrtm(c1 @ c2)`, real part', 'course as written: the same from float32 statistics']
              if has_scipy else []),
            'course notebook: `_sqrtm_newton_schulz(c1 @ c2)`', '`torch.linalg.eigvals(c1 @ c2)` (general eigenvalues)',
            'reference: QR of the features, singular values of R1 R2ᵀ']
    assert list(rows) == want
    ours = rows['miniai `_calc_fid` (eigh, symmetric, float64)']
    assert float(ours[4]) <= 1e-6 and float(ours[6]) <= 1e-6, 'agrees with the reference, full rank and not'
    assert abs(float(ours[7])) < 1e-9, 'a set against itself'
    assert ('| 1.0x |' in md) == has_scipy and ('pip install' in md) != has_scipy
    assert float(rows['reference: QR of the features, singular values of R1 R2ᵀ'][4]) == 0
