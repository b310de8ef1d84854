# befund: `make run` starts the node, `make test` runs the suite. Nothing else is needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests use, each with a file that tells whether it is installed.
APT_DEPS := dcmtk:/usr/bin/storescu dicom3tools:/usr/bin/dciodvfy orthanc:/usr/sbin/Orthanc \
	chromium:/usr/bin/chromium libpixelmed-java:/usr/share/java/pixelmed.jar \
	default-jre-headless:/usr/bin/java postgresql:/usr/lib/postgresql/15/bin/initdb

# The venv's editable install points at one checkout; a copy (with its .venv) must run its own
# code, so the checkout's path is part of what the install depends on. pip runs as
# `python -m pip`: a copied venv's pip script would run the original venv's python.
CHECKOUT := $(VENV)/.checkout-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)

.PHONY: install run test lint demo bench train-ich train-wsi train-seg bento system-deps clean

install: $(BIN)/befund

$(CHECKOUT):
	mkdir -p $(VENV) && rm -f $(VENV)/.checkout-* && touch $@

$(BIN)/befund: requirements.lock pyproject.toml $(CHECKOUT)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip<27"
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev-installed: requirements-dev.lock $(BIN)/befund
	$(BIN)/python -m pip install -q -r requirements-dev.lock
	touch $@

run: $(BIN)/befund
	$(BIN)/befund serve

system-deps:
	@missing=""; for dep in $(APT_DEPS); do test -e "$${dep#*:}" || missing="$$missing $${dep%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The suite mostly waits on real peers (nodes starting, PACS round trips), so it runs its test
# files in TEST_WORKERS processes (pytest-xdist; one file stays in one process, for its
# module-scoped node): on 2 cores the serial run took ~20 min wall for ~12 min of CPU.
TEST_WORKERS ?= 3

test: system-deps $(VENV)/.dev-installed
	$(BIN)/ruff check service pipelines phantoms models benchmarks tests
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check service pipelines phantoms models benchmarks tests

bench: system-deps $(VENV)/.dev-installed
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/time_to_result.py
	$(BIN)/python benchmarks/model_service.py

# Orthanc (the PACS) and befund on this machine, three studies through them; Ctrl-C stops both.
demo: system-deps $(BIN)/befund
	$(BIN)/python -m service.demo

# Training needs PyTorch, which never enters the product's venv.
.train-venv/bin/python: requirements-train.txt
	$(PYTHON) -m venv .train-venv
	.train-venv/bin/pip install -q -r requirements-train.txt
	touch $@

train-ich: .train-venv/bin/python
	PYTHONPATH=. .train-venv/bin/python models/ich_ct/train.py

train-wsi: .train-venv/bin/python
	PYTHONPATH=. .train-venv/bin/python models/tumor_wsi/train.py

train-seg: .train-venv/bin/python
	PYTHONPATH=. .train-venv/bin/python models/ich_seg/train.py

bento: $(BIN)/befund
	$(BIN)/bentoml build

clean:
	rm -rf $(VENV) .train-venv var benchmarks/out tests/artifacts
