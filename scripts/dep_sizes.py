"""What installing a distribution brings: every distribution it needs (its requirements, followed through), with the
size each takes on disk, as a Markdown table. Run it with the python of the environment to measure:
    python scripts/dep_sizes.py miniai-learner
Sizes are summed from each distribution's RECORD (what pip installed), so they are sizes on disk, not downloads."""
import re
import sys
from importlib import metadata


def _size(dist) -> int:
    return sum(f.size or 0 for f in (dist.files or []) if getattr(f, 'size', None))


def _key(name: str) -> str: return re.sub(r'[-_.]+', '-', name).lower()


def closure(root: str) -> dict:
    """Each needed distribution's key -> (distribution, the first distribution found to need it). Requirements for an
    extra count where a requirement asks for that extra (torch's `cuda-toolkit[cublas,...]`); other markers are taken
    as true (these tables are for Linux)."""
    dists = {_key(d.metadata['Name']): d for d in metadata.distributions()}
    seen, done, todo = {}, set(), [(_key(root), (), None)]
    while todo:
        k, extras, by = todo.pop()
        if (k, extras) in done or k not in dists: continue
        done.add((k, extras))
        seen.setdefault(k, (dists[k], by))
        for req in dists[k].requires or []:
            m = re.match(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?', req)
            want = re.findall(r'extra\s*==\s*["\']([^"\']+)', req)
            if not m or (want and not set(map(_key, want)) & set(extras)): continue
            wanted = tuple(sorted(_key(e) for e in (m.group(2) or '').split(',') if e.strip()))
            todo.append((_key(m.group(1)), wanted, dists[k].metadata['Name']))
    return seen


def main(root: str) -> None:
    rows = sorted(((_size(d), d.metadata['Name'], d.version, by) for d, by in closure(root).values()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f'| distribution | version | MB on disk | needed by |\n|---|---|---:|---|')
    for size, name, version, by in rows: print(f'| {name} | {version} | {size / 1e6:.1f} | {by or "-"} |')
    print(f'| **{len(rows)} distributions** | | **{total / 1e6:.0f}** | |')


if __name__ == '__main__': main(sys.argv[1] if len(sys.argv) > 1 else 'miniai-learner')
