#!/usr/bin/env bash
# Does the built wheel stand alone? Builds the sdist and, from it, the wheel (`python -m build`: a file the sdist lacks
# fails here), installs the wheel into a fresh venv outside the source tree, and runs scripts/wheel_smoke_check.py
# there: every public module imports, a 1-epoch fit, `python -m miniai train --help`, and `load_exported` of a model
# the editable install exported. `make wheel-smoke` runs it (CI too).
#   PY           the editable install's python (default .venv/bin/python)
#   BUILD_PY     the python that runs `build` (default PY)
#   SMOKE_TORCH  the torch pair for the fresh venv to install, e.g. 'torch==2.3.1 torchvision==0.18.1' (default: lend
#                it PY's torch, torchvision and what they need, through a .pth file: scripts/wheel_smoke_torch.py)
#   SMOKE_EXPORT_IN_VENV=1  export with the fresh venv's torch (its python, the source tree on its path, for that step
#                only): a torch.export program loads only into the torch that wrote it, so testing another torch needs it
#   SMOKE_PIP    extra arguments for that venv's pip (e.g. --find-links DIR for torch wheels downloaded beforehand)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-.venv/bin/python}
BUILD_PY=${BUILD_PY:-$PY}
SMOKE_TORCH=${SMOKE_TORCH:-lend}
SMOKE_PIP=${SMOKE_PIP:-}
WORK=$(mktemp -d /tmp/miniai-wheel-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "== [$((SECONDS - t0))s] $*"; }

step "build the sdist and the wheel"
"$BUILD_PY" -m build --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/*.whl)
ls -l "$WORK"/dist | tail -n +2
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
infos = z.infolist()
print(f'wheel: {len(infos)} files, {sum(i.file_size for i in infos) / 1e3:.0f} kB unpacked')
# PEP 561: without the marker, type checkers ignore the package's annotations
assert 'miniai/py.typed' in z.namelist(), 'the wheel lacks miniai/py.typed (setup.py package_data)'
print('wheel: miniai/py.typed is there')
PYEOF

EDITABLE_PATH=${PYTHONPATH:-}  # what the editable side was run with
unset PYTHONPATH  # nothing of the source tree from here on, except for the export
export MINIAI_DEVICE=cpu
step "a fresh venv: torch ($SMOKE_TORCH), then the wheel"
python3 -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
# shellcheck disable=SC2086  # SMOKE_TORCH and SMOKE_PIP are lists of arguments
vpip() { "$VPY" -m pip install -q --disable-pip-version-check $SMOKE_PIP "$@" > "$WORK/pip.log" 2>&1 \
         || { grep -v '^WARNING: Location' "$WORK/pip.log"; exit 1; }; }
if [ "$SMOKE_TORCH" = lend ]; then
  "$PY" scripts/wheel_smoke_torch.py "$WORK/torch-site"
  echo "$WORK/torch-site" > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lent_torch.pth"
else
  vpip $SMOKE_TORCH
fi
step "pip install $(basename "$WHEEL")"
vpip "$WHEEL"
"$VPY" -m pip check
if [ "${SMOKE_EXPORT_IN_VENV:-0}" = 1 ]; then
  step "export a model with the source tree and the fresh venv's torch"
  PYTHONPATH=$REPO "$VPY" scripts/wheel_smoke_export.py "$WORK/exported"
else
  step "export a model with the editable install"
  PYTHONPATH=$EDITABLE_PATH "$PY" scripts/wheel_smoke_export.py "$WORK/exported"
fi
"$VPY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|torchvision|fastprogress|miniai-learner)=' | tr '\n' ' '
echo

# outside the source tree, with nothing of it on the path
cd "$WORK"
step "python -m miniai train --help"
"$VPY" -m miniai train --help | head -3
"$WORK/venv/bin/miniai" --help > /dev/null
step "imports, a 1-epoch fit, load_exported"
"$VPY" "$REPO/scripts/wheel_smoke_check.py" "$WORK/exported"
step "the wheel stands alone"
