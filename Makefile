# swapproxy: `make run` starts it, `make test` runs the whole suite. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LISTEN ?= tcp:8080:interface=127.0.0.1
CONFIG ?= $(if $(wildcard config.yaml),config.yaml,etc/demo.yaml)
TESTS ?= tests

.PHONY: run test bench llama-server clean

$(BIN)/twistd: setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

run: $(BIN)/twistd
	@echo "swapproxy: serving $(CONFIG) on $(LISTEN). In another terminal, try:"
	@echo "  curl -s http://127.0.0.1:8080/v1/models"
	@echo "  curl -sN http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"model\": \"demo-slow\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"
	$(BIN)/twistd -n --pidfile= swapproxy -c $(CONFIG) -l $(LISTEN)

test: $(BIN)/twistd
	$(BIN)/python -W error::RuntimeWarning -m twisted.trial --temp-directory=.trial-tmp $(TESTS)

# Builds (or finds) llama-server for the end-to-end tests; prints its path.
llama-server:
	@scripts/build_llama_server.sh

bench: $(BIN)/twistd
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .trial-tmp *.egg-info
