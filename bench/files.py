"""What writing files safely costs: `atomic_path` (a temporary file beside the target, synced to the disk, renamed)
against a plain write, for the files miniai writes: a checkpoint-sized file and a data set's small PNGs.

    python -m bench.files [--rounds 3] [--n 500]

Both ways are timed side by side in each round, the fastest round of each reported. It is why every file miniai
writes goes through `atomic_path` except `write_image_folder`'s images (README of miniai.data.folders)."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from miniai.core.files import write_atomic

RESULTS = Path(__file__).parent / 'results'


def _time(write, folder: Path, n: int, data: bytes) -> float:
    "Seconds per file to write `n` files of `data` into `folder` with `write(path, data)`."
    t = time.perf_counter()
    for i in range(n): write(folder / f'{i}.bin', data)
    return (time.perf_counter() - t) / n


def run(rounds: int = 3, n: int = 500) -> dict:
    "Seconds per file, plain and atomic, for a small image (700 bytes) and a checkpoint (20 MB, fewer files)."
    plain = lambda p, d: p.write_bytes(d)
    sizes = {'small PNG (700 B)': (700, n), 'checkpoint (20 MB)': (20 << 20, max(2, n // 100))}
    res = {k: {'plain': float('inf'), 'atomic': float('inf')} for k in sizes}
    with tempfile.TemporaryDirectory(dir=os.environ.get('MINIAI_BENCH_DIR')) as tmp:
        for r in range(rounds):
            for what, (size, count) in sizes.items():
                data = os.urandom(size)
                for how, write in (('plain', plain), ('atomic', write_atomic)):
                    folder = Path(tmp) / f'{r}-{how}-{size}'
                    folder.mkdir()
                    res[what][how] = min(res[what][how], _time(write, folder, count, data))
    return res


def table(res: dict) -> str:
    lines = ['| file | plain write | `atomic_path` (synced, renamed) | ratio |', '|---|---|---|---|']
    for what, r in res.items():
        lines.append(f"| {what} | {r['plain'] * 1e3:.3f} ms | {r['atomic'] * 1e3:.3f} ms | "
                     f"{r['atomic'] / r['plain']:.1f}x |")
    return '\n'.join(lines)


def main(argv=None) -> str:
    "Time both ways; print the table and write it to bench/results/files.md."
    p = argparse.ArgumentParser(prog='python -m bench.files')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--n', type=int, default=500, help='small files a round (a hundredth as many checkpoints)')
    args = p.parse_args(argv)
    md = table(run(args.rounds, args.n))
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'files.md').write_text(f'# Writing files safely\n\n`python -m bench.files --rounds {args.rounds} '
                                      f'--n {args.n}`, on the disk of the machine that ran it.\n\n{md}\n')
    return md


if __name__ == '__main__': main()
