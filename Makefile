# l4lb: `make setup` once, then `make test`. See README.md.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-unit test-kernel demo bench bench-quick docker-test proto clean

setup:
	@bash scripts/setup.sh

test:
	@$(PYTEST) -q -ra tests

test-unit:
	@$(PYTEST) -q tests/unit

test-kernel:
	@$(PYTEST) -q tests/kernel

demo:
	@.venv/bin/l4lb demo

# AGAINST=REF: the per-packet costs of the working tree against git commit REF (A/B)
bench:
	@if [ -n "$(AGAINST)" ]; then $(PY) -m bench.pktcost --against "$(AGAINST)"; \
	else $(PY) -m bench.run; fi

bench-quick:
	@$(PY) -m bench.run --quick

clean:
	rm -rf build .pytest_cache l4lb/_maglev_fill.*.so

# the one recorded command that regenerates the gRPC modules (never edit them)
proto:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. control/l4lb/v1/l4lb.proto

# containers: docker/compose.yaml's LB, backends, router and client on a Docker
# engine (started, and docker.io installed, if none answers); docs/docker.md
docker-test:
	@$(PYTEST) -q -ra tests/docker
