# Iskander: the two user commands are `make serve` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

FLIGHT_PORT ?=
GRPC_PORT   ?=
METRICS_PORT ?=
CONFIG      ?=
PYTEST_ARGS ?=

.PHONY: help install install-dev serve test proto demo-models bench-overhead soak clean

help:
	@echo "make serve   install (first run) and serve the demo models: Flight :50051, gRPC :8001"
	@echo "             (CONFIG=file.toml, FLIGHT_PORT=, GRPC_PORT= override; METRICS_PORT=8002 adds /metrics)"
	@echo "make test    install with dev extras (first run) and run the test suite"
	@echo "make proto   regenerate iskander/_proto from proto/*.proto"
	@echo "make demo-models  rebuild the demo ONNX models shipped in iskander/demo"
	@echo "make bench-overhead  closed-loop per-request overhead vs onnxruntime in process (BATCH=128)"
	@echo "make bench   load harness vs minimal servers and MLServer (BENCH_ARGS=--quick for a smoke run)"
	@echo "make soak    mixed valid/invalid traffic on both protocols (SOAK_SECONDS=60)"

# venv needs ensurepip (python3-venv on Debian/Ubuntu); fall back to virtualenv from PyPI.
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); $(PYTHON) -m pip install --user -q virtualenv && $(PYTHON) -m virtualenv -q $(VENV); }
	$(PIP) install --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(PY) -m iskander $(if $(CONFIG),--config $(CONFIG),) $(if $(FLIGHT_PORT),--flight-port $(FLIGHT_PORT),) \
		$(if $(GRPC_PORT),--grpc-port $(GRPC_PORT),) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT),)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

proto: $(VENV)/.installed-dev
	bash scripts/gen_proto.sh $(PY)

demo-models: $(VENV)/.installed-dev
	$(PY) -m iskander.demo.build

# Closed-loop overhead probe (not part of `make test`); writes bench/results/<date>/overhead_b<batch>.json
BATCH ?= 128
bench-overhead: $(VENV)/.installed-dev
	$(PY) bench/overhead.py --batch $(BATCH)

# Soak: mixed valid/invalid traffic on both protocols; fails if a valid request is lost
SOAK_SECONDS ?= 60
soak: $(VENV)/.installed-dev
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Load benchmark: open-loop sweeps vs a minimal Flight/grpcio server, MLServer and in-process
# onnxruntime, closed-loop peaks, dynamic batching on/off, RSS under 8192-row batches. Not part of
# `make test`; the full run takes about an hour, so use a quiet machine. BENCH_ARGS=--quick for a
# smoke run. Writes bench/results/<date>/<run>/; tables: $(PY) bench/report.py <that folder>
.PHONY: bench
BENCH_ARGS ?=
bench: $(VENV)/.installed-dev
	$(PIP) install -r bench/requirements.txt
	$(PY) bench/run.py $(BENCH_ARGS)
