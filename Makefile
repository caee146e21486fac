# One-command set-up and checks. Every target creates/reuses .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint bench demo demo-multilabel clean

venv: $(STAMP)

# Reinstall only when a requirements or constraints file changed (a second run reuses the venv).
$(STAMP): requirements.txt requirements-dev.txt requirements-retrieval.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-retrieval.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

# The whole workflow on a generated dataset (about 3 minutes on a 2-core CPU; a GPU is used when present).
demo: $(STAMP)
	$(PY) tools/run_demo.py --work-dir demo_run

demo-multilabel: $(STAMP)
	$(PY) tools/run_demo.py --work-dir demo_run --multilabel

clean:
	rm -rf $(VENV) .pytest_cache

bench: $(STAMP)
	$(PY) bench/run_bench.py --output bench/results.md
