"""FID's numerics: time and agreement of the ways to compute it, on 10,000 x 512 features.

    python -m bench.fid [--n 10000] [--d 512] [--few 300] [--rounds 3] [--threads N]

Every FID needs tr((c1 c2)^½) for the two feature covariances. The contenders, each given the same float64 means
and covariances (but for one row):
- miniai's `_calc_fid`: the eigenvalues of the symmetric `c1^½ c2 c1^½` through `eigh` (float64, no scipy);
- the course's: `scipy.linalg.sqrtm(c1 @ c2)` of the non-symmetric product, imaginary part dropped, given float64
  statistics and, as the course computes them, float32 ones (left out when scipy is not installed:
  `pip install -e '.[bench]'`);
- the course notebook's alternative, `_sqrtm_newton_schulz(c1 @ c2)` (100 iterations at most);
- a second independent implementation: the general (non-symmetric) eigenvalues of `c1 @ c2`, `torch.linalg.eigvals`.
The reference they are all measured against works on the features, not their covariances: with X1, X2 the centred
features over √(n - 1), tr((c1 c2)^½) is the sum of the singular values of X1 X2ᵀ, taken through QR factors as the
singular values of R1 R2ᵀ (float64). Three cases: two full-rank sets of `n` features, the same two sets cut to `few`
images (fewer than features: rank-deficient covariances), and a set against itself (the FID must be 0).

The features are Gaussian with a power-law spectrum (the k-th principal axis has standard deviation k^-p, p = 1 for
one set, 0.8 for the other, a 0.01 shift of the mean), which gives covariances as ill-conditioned as a network's
features (condition number about 2.6e5 at 512 features). Times are medians of `rounds` runs after a warm-up run,
for the FID from the statistics (the reference: from the features).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from miniai.fid import _calc_fid, _calc_stats, _sqrtm_newton_schulz

RESULTS = Path(__file__).parent / 'results'


def features(n: int, d: int, power: float, shift: float, seed: int) -> torch.Tensor:
    "n Gaussian features of width d, principal axes at random with standard deviations k^-power, mean `shift`."
    g = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sd = torch.arange(1, d + 1, dtype=torch.float64) ** -power
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * sd) @ axes.T + shift


def _fid_from_trace(m1, c1, m2, c2, tr_sqrt: float) -> float:
    return ((m1 - m2).square().sum() + c1.trace() + c2.trace()).item() - 2 * tr_sqrt


def reference_fid(x: torch.Tensor, y: torch.Tensor) -> float:
    "FID from the features themselves: tr((c1 c2)^½) as the sum of the singular values of R1 R2ᵀ (QR of each set)."
    x, y = x.double(), y.double()
    a, b = x - x.mean(0), y - y.mean(0)
    r1 = torch.linalg.qr(a, mode='r')[1] / (len(a) - 1) ** .5
    r2 = torch.linalg.qr(b, mode='r')[1] / (len(b) - 1) ** .5
    tr_sqrt = torch.linalg.svdvals(r1 @ r2.T).sum().item()
    mean2 = (x.mean(0) - y.mean(0)).square().sum().item()
    return mean2 + r1.square().sum().item() + r2.square().sum().item() - 2 * tr_sqrt


def scipy_fid(m1, c1, m2, c2) -> tuple[float, str]:
    "The course's way: `scipy.linalg.sqrtm(c1 @ c2)`, keeping the real part; notes what it dropped or warned."
    from scipy import linalg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        root = linalg.sqrtm((c1 @ c2).numpy())
    notes = [f'dropped imaginary part up to {abs(root.imag).max():.1e}'] if root.imag.any() else []
    notes += [str(w.message).split('\n')[0] for w in caught]
    return _fid_from_trace(m1, c1, m2, c2, float(root.real.trace())), '; '.join(notes)


def newton_schulz_fid(m1, c1, m2, c2) -> tuple[float, str]:
    return _fid_from_trace(m1, c1, m2, c2, _sqrtm_newton_schulz(c1 @ c2).trace().item()), ''


def eigvals_fid(m1, c1, m2, c2) -> tuple[float, str]:
    ev = torch.linalg.eigvals(c1 @ c2)
    notes = f'imaginary parts up to {ev.imag.abs().max():.0e} dropped, real parts down to {ev.real.min():.0e} clamped'
    return _fid_from_trace(m1, c1, m2, c2, ev.real.clamp(min=0).sqrt().sum().item()), notes


def miniai_fid(m1, c1, m2, c2) -> tuple[float, str]: return _calc_fid(m1, c1, m2, c2), ''


def course_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "The course's `_calc_stats`: mean and covariance in the features' own float32."
    f = feats.float()
    return f.mean(0), f.T.cov()


def contenders() -> list[tuple[str, object, object]]:
    """(name, fid(m1, c1, m2, c2) -> (value, notes), the statistics it is given); the course's scipy rows only when
    scipy is installed."""
    res = [('miniai `_calc_fid` (eigh, symmetric, float64)', miniai_fid, _calc_stats)]
    try:
        import scipy  # noqa: F401
        res += [('course: `scipy.linalg.sqrtm(c1 @ c2)`, real part', scipy_fid, _calc_stats),
                ('course as written: the same from float32 statistics', scipy_fid, course_stats)]
    except ImportError: pass
    res += [('course notebook: `_sqrtm_newton_schulz(c1 @ c2)`', newton_schulz_fid, _calc_stats),
            ('`torch.linalg.eigvals(c1 @ c2)` (general eigenvalues)', eigvals_fid, _calc_stats)]
    return res


def timed(fn, *args, rounds: int):
    fn(*args)  # warm-up: the first call of a LAPACK routine pays for loading it
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel(a: float, b: float) -> float: return abs(a - b) / abs(b)


def run(n: int = 10000, d: int = 512, few: int = 300, rounds: int = 3) -> list[dict]:
    "One row per contender: seconds, FID and relative error in each case, same-set FID, notes."
    x, y = features(n, d, 1.0, 0., seed=1), features(n, d, 0.8, 0.01, seed=2)
    ref_secs, ref_full = timed(reference_fid, x, y, rounds=rounds)
    ref_small = reference_fid(x[:few], y[:few])
    rows = []
    for name, fn, stats in contenders():
        full, small = (stats(x), stats(y)), (stats(x[:few]), stats(y[:few]))
        secs, (fid, notes) = timed(fn, *full[0], *full[1], rounds=rounds)
        fid_small, notes_small = fn(*small[0], *small[1])
        same, _ = fn(*full[0], *full[0])
        rows.append({'method': name, 'seconds': secs, 'fid': fid, 'rel_err': rel(fid, ref_full), 'fid_few': fid_small,
                     'rel_err_few': rel(fid_small, ref_small), 'same': same,
                     'notes': '; '.join(f'{k}: {v}' for k, v in (('full', notes), (f'{few}', notes_small)) if v)})
    rows.append({'method': 'reference: QR of the features, singular values of R1 R2ᵀ', 'seconds': ref_secs,
                 'fid': ref_full, 'rel_err': 0., 'fid_few': ref_small, 'rel_err_few': 0., 'same': None,
                 'notes': 'from the features, not the covariances'})
    return rows


def table(rows: list[dict], n: int, d: int, few: int, rounds: int) -> str:
    course = next((r['seconds'] for r in rows if r['method'].startswith('course: ')), None)
    lines = [f'### FID of two sets of {n:,} x {d} features (float64), and of their first {few} (rank-deficient '
             f'covariances); median of {rounds} runs; torch {torch.__version__}, {torch.get_num_threads()} threads',
             '', f'| method | s | speed-up vs course | FID | rel. error | FID, {few} images | rel. error, {few} | '
             f'same set | notes |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        speed = f'{course / r["seconds"]:.1f}x' if course else '-'
        same = '-' if r['same'] is None else f'{r["same"]:.1e}'
        lines.append(f'| {r["method"]} | {r["seconds"]:.3f} | {speed} | {r["fid"]:.10f} | {r["rel_err"]:.1e} | '
                     f'{r["fid_few"]:.10f} | {r["rel_err_few"]:.1e} | {same} | {r["notes"]} |')
    if course is None: lines += ['', "scipy is not installed, so the course's row is missing: pip install -e '.[bench]'"]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=10000, help='features per set')
    p.add_argument('--d', type=int, default=512, help='feature width')
    p.add_argument('--few', type=int, default=300, help='images in the rank-deficient case (fewer than --d)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--threads', type=int, default=None, help="threads for torch and scipy's BLAS (default: their "
                                                            "own); 1 on a busy machine, where OpenMP threads wait")
    p.add_argument('--out', type=Path, default=RESULTS / 'fid.md')
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ['OPENBLAS_NUM_THREADS'] = str(a.threads)  # scipy's own BLAS, read when scipy.linalg loads
    md = table(run(a.n, a.d, a.few, a.rounds), a.n, a.d, a.few, a.rounds)
    print(md)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md + '\n')


if __name__ == '__main__': main()
