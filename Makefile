# Two commands for a newcomer: `make train` (the main job) and `make test` (the suite).
# Each sets up what it needs: a .venv in the checkout, the package in editable mode, and the data.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.miniai-installed
# torch and torchvision are pinned as a pair: on these machines pip takes both from local disk.
TORCH  := torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev

.PHONY: setup data test typecheck wheel-smoke docs docs-check train bench notebooks clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP) data

data:
	@bash scripts/get_data.sh

# the suite in 2 processes (pytest-xdist; more on a bigger machine, at most 4): much of it is single-threaded Python
# (imports, notebook kernels, subprocesses) that a second process overlaps. `-n 0` runs it in one process
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests

# the package's type check: pyright as pyproject.toml's [tool.pyright] sets it (docs/dependencies.md: its time, result)
typecheck: setup
	$(PY) -m pyright --pythonpath $(PY)

# the built wheel in a fresh venv, outside the source tree (scripts/wheel_smoke.sh says what it checks)
wheel-smoke: setup
	PY=$(PY) bash scripts/wheel_smoke.sh

# the documentation site, built --strict (a broken link or reference fails) into build/site; mkdocs.yml says how
docs: setup
	$(PY) -m pip install -q -e '.[docs]'
	$(PY) scripts/docs_pages.py build/docs
	$(PY) -m mkdocs build --strict

# the built site opened in headless Chromium (apt-get install chromium): the home page, a tutorial and an API page
# render; screenshots to docs/screenshots/. Not in CI: installing Chromium would take CI past its time budget
docs-check: docs
	$(PY) scripts/docs_render_check.py

train: setup
	$(PY) -m miniai train $(ARGS)

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
