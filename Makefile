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

# Every tier runs, none is skipped: `make test` installs the tools the real-process tiers need
# (scripts/test_prerequisites.sh: a C++ toolchain, Chromium and its driver, systemd-analyze; with
# apt-get as root, else it says what to install), finds a llama-server ($$LLAMA_SERVER, PATH, the
# cache) or builds one into ~/.cache/swapproxy (once: about 5 minutes on 2 cores), and stops with
# what to do when it can do neither.
test: $(BIN)/twistd
	@scripts/test_prerequisites.sh
	@llama=$$(PYTHON=$(abspath $(BIN)/python) scripts/build_llama_server.sh) \
	  && PYTHON=$(abspath $(BIN)/python) scripts/build_llama_server.sh --vocab-dir >/dev/null \
	  || { echo "make test: the end-to-end tests need llama-server and llama.cpp's vocab files, and" \
	            "scripts/build_llama_server.sh could not provide them (see above). Install what it names" \
	            "(Debian: sudo apt-get install -y build-essential cmake) and run make test again, or set" \
	            "LLAMA_SERVER to a llama-server binary." >&2; exit 1; }; \
	llama=$$(printf '%s\n' "$$llama" | tail -n 1); \
	echo "make test: end-to-end tests use $$llama"; \
	LLAMA_SERVER=$$llama SWAPPROXY_REQUIRE_BROWSER=1 $(BIN)/python -W error::RuntimeWarning -m twisted.trial --temp-directory=.trial-tmp $(TESTS)

# Builds (or finds) llama-server for the end-to-end tests; prints its path.
llama-server: $(BIN)/twistd
	@PYTHON=$(abspath $(BIN)/python) scripts/build_llama_server.sh

bench: $(BIN)/twistd
	$(BIN)/python -m bench
	$(BIN)/python -m bench.slots

clean:
	rm -rf $(VENV) .trial-tmp *.egg-info
