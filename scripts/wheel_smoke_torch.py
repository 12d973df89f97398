"""Lend torch to the wheel smoke's fresh venv without installing it again (`make wheel-smoke` default; installing the
CUDA build's 5.5 GB takes one to two minutes): link torch, torchvision and what they need, nothing else, from this
python's environment into a folder, for a .pth file in the fresh venv to put on its path. pip there sees them as
installed, so the wheel's own requirements are all that it installs.
    python scripts/wheel_smoke_torch.py DEST"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dep_sizes import closure  # noqa: E402


def main(dest: Path) -> None:
    dest.mkdir(parents=True)
    needed = {**closure('torch'), **closure('torchvision')}
    linked = set()
    for dist, _ in needed.values():
        site = Path(dist.locate_file(''))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ('..', '__pycache__') or top in linked or not (site / top).exists(): continue
            (dest / top).symlink_to(site / top)
            linked.add(top)
    names = sorted(d.metadata['Name'] for d, _ in needed.values())
    print(f'lent {len(names)} distributions: {", ".join(names)}')


if __name__ == '__main__': main(Path(sys.argv[1]))
