# make test: the checks CI runs (lint, types, layers, every test). make demo: the local lab.
# Both expect scripts/setup.sh to have run (the README's commands run it first).
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup test lint unit demo clean proto

setup:
	bash scripts/setup.sh

lint:
	$(BIN)/ruff check src tests e2e bench conftest.py
	$(BIN)/ruff format --check src tests e2e bench conftest.py
	$(BIN)/mypy
	$(BIN)/lint-imports

# The lab's scenarios and the other tests, as two pytest sessions at once.
test: lint
	PYTEST=$(BIN)/pytest bash scripts/pytest-streams.sh $(PYTEST_ARGS)

# The fast tests only: no control plane, no VMs.
unit:
	$(BIN)/pytest -m "not cluster and not kernel" $(PYTEST_ARGS)

demo:
	$(BIN)/flashmesh lab demo

clean:
	$(BIN)/flashmesh lab cluster down || true

# The CSI stubs, from the vendored csi.proto (committed; tests/test_proto.py checks them).
PROTO := src/flashmesh/csi_driver/_proto/csi.proto
proto:
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src \
	  --grpc_python_out=src $(PROTO)
