"""Open the built documentation site (build/site) in headless Chromium, served over HTTP as a host would, and check
that the home page, a tutorial and an API page render: each page's rendered DOM has its heading and its content (the
tutorial's saved outputs, the API page's documented names). Screenshots go to docs/screenshots/.
    python scripts/docs_render_check.py [SITE]    (needs `chromium`: apt-get install chromium)"""
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# page -> what its rendered DOM must hold
PAGES = {
    'index.html': ['Getting started', 'callback-driven training library'],
    'tutorials/01_learner/index.html': ['jp-OutputArea', 'MetricsCB'],
    'api/core/index.html': ['miniai.core.learner.Learner', 'doc-signature'],
}


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def chromium() -> str:
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(name): return shutil.which(name)
    raise SystemExit('docs_render_check: no chromium here (apt-get install chromium)')


def main(site: Path) -> None:
    exe, shots = chromium(), ROOT / 'docs' / 'screenshots'
    shots.mkdir(exist_ok=True)
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{server.server_address[1]}/'
    failed = []
    with tempfile.TemporaryDirectory() as profile:
        flags = [exe, '--headless', '--no-sandbox', '--disable-gpu', f'--user-data-dir={profile}',
                 '--window-size=1280,900', '--virtual-time-budget=5000']
        for page, needles in PAGES.items():
            dom = subprocess.run([*flags, '--dump-dom', base + page], capture_output=True, text=True,
                                 timeout=120).stdout
            missing = [n for n in needles if n not in dom]
            shot = shots / (page.replace('/index.html', '').replace('/', '_').replace('.html', '') + '.png')
            subprocess.run([*flags, f'--screenshot={shot}', base + page], capture_output=True, timeout=120)
            ok = not missing and shot.exists() and shot.stat().st_size > 10_000
            print(f'{"ok  " if ok else "FAIL"} {page}: {len(dom):,} characters of DOM, '
                  f'screenshot {shot.relative_to(ROOT)}'
                  + (f'; missing {missing}' if missing else ''))
            if not ok: failed.append(page)
    server.shutdown()
    if failed: raise SystemExit(f'docs_render_check: {failed} did not render')


if __name__ == '__main__': main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / 'build' / 'site')
