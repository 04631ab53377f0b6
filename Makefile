# Every target creates .venv on first use. torch and torchvision are pinned here to the
# releases this machine's pip serves from local disk; the package itself asks for ranges.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST := $(BIN)/python -m pytest

.PHONY: venv demo test test-all bench bench-onnx bench-compile clean

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

# Issue 4: speed with the peers in the same rounds, memory and scaling, then benchmarks/README.md
# rewritten from benchmarks/results/*.json (the quality section is kept). The speed run also times the
# forward and the eager explainer on a channels_last batch (--channels-last); benchmarks.allocator then
# compares processes with and without tsgb_fx.reuse_freed_memory() at batch 8. 12 minutes measured on
# these 2 shared cores. ORT runs on BENCH_ONNX_MODELS only: exporting an explainer takes 0.5-2 min per
# model here (the one-off tables). compile=True is a separate target, `make bench-compile` (a cold
# torch.compile per model and batch size, 0.5-4 minutes each here), whose results the report picks up.
# Rows whose rounds are quick get more of them (BENCH_MIN_SECONDS, see benchmarks/common.py).
# Override e.g. `make bench BENCH_MODELS=resnet50 BENCH_REPEATS=5 BENCH_THREADS=1`.
BENCH_MODELS ?= resnet50 vgg16 densenet121 mobilenet_v2 efficientnet_b0
BENCH_ONNX_MODELS ?= resnet50
BENCH_ALLOCATOR_MODELS ?= resnet50 densenet121 mobilenet_v2 efficientnet_b0
BENCH_REPEATS ?= 3
BENCH_MIN_SECONDS ?= 20
BENCH_THREADS ?=
BENCH_RESULTS := benchmarks/results
BENCH_ARGS = --repeats $(BENCH_REPEATS) $(if $(BENCH_THREADS),--threads $(BENCH_THREADS))

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BIN)/.bench-installed
	@mkdir -p $(BENCH_RESULTS)
	@date +%s > $(BENCH_RESULTS)/started
	$(BIN)/python -m benchmarks.speed --models $(BENCH_MODELS) --batch-sizes 1 8 $(BENCH_ARGS) --channels-last \
		--min-seconds $(BENCH_MIN_SECONDS) \
		--onnx-models $(BENCH_ONNX_MODELS) --peers \
		--json-out $(BENCH_RESULTS)/speed.json --peers-json-out $(BENCH_RESULTS)/peers.json
	$(BIN)/python -m benchmarks.memory --models $(BENCH_MODELS) --batch-sizes 1 8 \
		$(if $(BENCH_THREADS),--threads $(BENCH_THREADS)) --cases forward_grad tsgb_eager \
		--json-out $(BENCH_RESULTS)/memory.json
	$(BIN)/python -m benchmarks.plot $(BENCH_ARGS) --json-out $(BENCH_RESULTS)/scaling.json
	$(BIN)/python -m benchmarks.allocator --models $(BENCH_ALLOCATOR_MODELS) --batch-sizes 8 $(BENCH_ARGS) \
		--json-out $(BENCH_RESULTS)/allocator.json
	$(BIN)/python -m benchmarks.report

# ORT on the models `make bench` does not export (minutes of export each here); the report adds
# them to the targets table, marked as a separate run.
BENCH_ONNX_EXTRA_MODELS ?= vgg16 densenet121 mobilenet_v2 efficientnet_b0

bench-onnx: $(BIN)/.bench-installed
	@mkdir -p $(BENCH_RESULTS)
	$(BIN)/python -m benchmarks.speed --models $(BENCH_ONNX_EXTRA_MODELS) --batch-sizes 1 8 $(BENCH_ARGS) \
		--min-seconds $(BENCH_MIN_SECONDS) --no-explicit --json-out $(BENCH_RESULTS)/onnx_extra.json
	$(BIN)/python -m benchmarks.report

# compile=True on every model, with the peers in the same rounds (a cold compile per model and
# batch size: about half an hour here), then its peak memory per call (cold compiles again, one
# fresh process per model: about 17 minutes); the report adds their targets.
BENCH_COMPILE_MODELS ?= $(BENCH_MODELS)

bench-compile: $(BIN)/.bench-installed
	@mkdir -p $(BENCH_RESULTS)
	$(BIN)/python -m benchmarks.speed --models $(BENCH_COMPILE_MODELS) --batch-sizes 1 8 $(BENCH_ARGS) \
		--min-seconds $(BENCH_MIN_SECONDS) --compile --peers --no-onnx --no-explicit \
		--json-out $(BENCH_RESULTS)/compile.json
	$(BIN)/python -m benchmarks.memory --models $(BENCH_COMPILE_MODELS) --batch-sizes 1 8 \
		$(if $(BENCH_THREADS),--threads $(BENCH_THREADS)) --cases forward_grad tsgb_compiled \
		--json-out $(BENCH_RESULTS)/memory_compile.json
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV) build *.egg-info
