# Iskander: the two user commands are `make serve` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

FLIGHT_PORT ?= 50051
GRPC_PORT   ?= 8001
CONFIG      ?=
PYTEST_ARGS ?=

.PHONY: help install install-dev serve test proto demo-models bench-overhead clean

help:
	@echo "make serve   install (first run) and serve the demo models: Flight :$(FLIGHT_PORT), gRPC :$(GRPC_PORT)"
	@echo "make test    install with dev extras (first run) and run the test suite"
	@echo "make proto   regenerate iskander/_proto from proto/*.proto"
	@echo "make demo-models  rebuild the demo ONNX models shipped in iskander/demo"
	@echo "make bench-overhead  closed-loop per-request overhead vs onnxruntime in process (BATCH=128)"

$(PY):
	$(PYTHON) -m venv $(VENV)
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
	$(PY) -m iskander --flight-port $(FLIGHT_PORT) --grpc-port $(GRPC_PORT) $(if $(CONFIG),--config $(CONFIG),)

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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
