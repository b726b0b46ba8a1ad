# Two entry points for a fresh machine (see README): `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: demo test setup system-deps lab dashboard benchmarks clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

setup: system-deps $(VENV)/.installed

system-deps:
	@bash scripts/system_deps.sh

demo: setup
	$(PY) -m workbench demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --allow-root notebooks/

dashboard: setup
	$(PY) -m workbench dashboard $(ARGS)

benchmarks: setup
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
