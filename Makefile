# Every target creates .venv on first use. torch and torchvision are pinned here to the
# releases this machine's pip serves from local disk; the package itself asks for ranges.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST := $(BIN)/python -m pytest

.PHONY: venv demo test test-all clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# Explain the bundled cat photo with the embedded pretrained EfficientNet-Lite0 (no download).
demo: venv
	$(BIN)/tsgb explain tsgb_fx/data/chelsea.png --out out/demo
	@echo "demo picture: $(CURDIR)/out/demo/chelsea_tsgb.png"

# Two pytest workers with one thread each: on 2 cores, torch's default of 2 threads per worker
# oversubscribes the machine and runs many times slower.
test: venv
	OMP_NUM_THREADS=1 $(PYTEST) -n 2

test-all: venv
	OMP_NUM_THREADS=1 $(PYTEST) -n 2 -m ''

clean:
	rm -rf $(VENV) build *.egg-info
