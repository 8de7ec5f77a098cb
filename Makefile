# `make test` and `make demo` work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/groupdiff demo --out demo-out

bench: $(VENV)/.installed
	$(PY) bench/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
