# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo_out

.PHONY: setup system-deps demo test lint bench clean

# Debian packages the tests need: Orthanc and its DICOMweb plugin (tests/servers.py starts a
# private one on 127.0.0.1). Installs as root (or with sudo) on Debian 12; skips when present.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pathembed sample --out $(DEMO)/slides
	$(BIN)/pathembed run --config configs/local.yaml --input $(DEMO)/slides --output-root $(DEMO)/out

system-deps:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(SYSTEM_PACKAGES) 2>/dev/null \
	      | grep -c '^install ok installed$$')" -eq "$(words $(SYSTEM_PACKAGES))" ]; then \
	  echo "system packages present: $(SYSTEM_PACKAGES)"; \
	else \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

test: system-deps $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Every stage measured in one run on generated slides (~7 min on 2 cores); results also as JSON.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py --json bench.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO) .pytest_cache
