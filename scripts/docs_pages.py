"""Assemble the documentation site's pages into one folder for MkDocs (`make docs`): the guides in docs/, the
getting-started page cut from the README's first sections (so the README and the site say the same thing, written
once), the notebooks with their saved outputs as tutorials, the benchmark results with their plots, and an API page
per room listing every module (mkdocstrings renders each module's public names, its `__all__`, from the docstrings).
    python scripts/docs_pages.py OUT"""
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# page -> (title, README sections it is made of, in order); the other guides are pages in docs/
PAGES = {
    'getting-started.md': ('Getting started', ['Install', 'Two commands', 'Quick start (notebook style)']),
}
ROOMS = ['core', 'data', 'callbacks', 'models', 'engines', 'runs', 'tools', 'app']


def readme_sections() -> dict:
    "The README's level-2 sections by heading, each with its subsections; the text before the first is 'intro'."
    parts = re.split(r'^## (.+)$', (ROOT / 'README.md').read_text(), flags=re.M)
    return {'intro': parts[0], **{parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}}


def from_readme(text: str) -> str:
    "README text for a site page: its links into docs/ (right on the repository's page) made relative to the site."
    return re.sub(r'\]\(docs/', '](', text)


def write_readme_pages(out: Path) -> None:
    secs = readme_sections()
    for page, (title, names) in PAGES.items():
        missing = [n for n in names if n not in secs]
        if missing: raise SystemExit(f'docs_pages: README.md has no section {missing}: update PAGES')
        body = ''.join(f'## {n}\n{secs[n]}' for n in names)
        (out / page).write_text(f'# {title}\n\n{from_readme(body)}')
    intro = secs['intro'].split('\n', 1)[1]  # without the '# miniai' title
    (out / 'index.md').write_text('# miniai\n' + from_readme(intro) + (ROOT / 'docs' / '_home.md').read_text())


def write_tutorials(out: Path) -> list:
    (out / 'tutorials').mkdir()
    nbs = sorted((ROOT / 'nbs').glob('*.ipynb'))
    for nb in nbs: shutil.copy(nb, out / 'tutorials' / nb.name)
    return [nb.name for nb in nbs]


def write_benchmarks(out: Path) -> None:
    dest = out / 'bench'
    dest.mkdir()
    for f in sorted((ROOT / 'bench' / 'results').iterdir()):
        if f.suffix in ('.png', '.md') and f.is_file(): shutil.copy(f, dest / f.name)
    plots = sorted(p.name for p in dest.glob('*.png'))
    tables = sorted(p.name for p in dest.glob('*.md') if p.name != 'README.md')
    with open(out / 'benchmarks.md', 'a') as f:
        f.write('\n## Plots\n\n' + ''.join(f'![{p}](bench/{p})\n\n' for p in plots))
        f.write('## Result tables\n\nEach written by its script under `bench/`: '
                + ', '.join(f'[{t[:-3]}](bench/{t})' for t in tables)
                + '; all of them in [one page](bench/README.md).\n')


def write_api(out: Path) -> None:
    (out / 'api').mkdir()
    for room in ROOMS:
        pkg = ROOT / 'miniai' / room
        mods = sorted(p.stem for p in pkg.glob('*.py') if not p.stem.startswith('_'))
        doc = (pkg / '__init__.py').read_text().split('"""')[1] if (pkg / '__init__.py').exists() else ''
        body = ''.join(f'## miniai.{room}.{m}\n\n::: miniai.{room}.{m}\n'
                       f'    options:\n      show_root_heading: false\n\n' for m in mods)
        (out / 'api' / f'{room}.md').write_text(f'# miniai.{room}\n\n{doc.strip()}\n\n{body}')


def main(out: Path) -> None:
    if out.exists(): shutil.rmtree(out)
    shutil.copytree(ROOT / 'docs', out, ignore=shutil.ignore_patterns('_*', 'screenshots'))
    write_readme_pages(out)
    write_tutorials(out)
    write_benchmarks(out)
    write_api(out)
    print(f'docs pages in {out}')


if __name__ == '__main__': main(Path(sys.argv[1]))
