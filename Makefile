# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on a fresh machine first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format-cpp gpu-check install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, by version, so pip takes them from the machine's local disk when
	# present; elsewhere the project's own range (torch>=2.6) applies.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q "torch>=2.6" "torchvision>=0.21"
	$(BIN)/pip install -q -e ".[test]"
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
		echo "note: could not install dataset-fashion-mnist; training on it will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

# The main job: one study end to end on the embedded default (short training on Fashion-MNIST,
# FLOPs, params and latency of every variant), then the report. Interrupted? Run it again: it
# resumes. `make demo STUDY=spatial-extent SEEDS=2` runs another study.
STUDY ?= logits
SEEDS ?= 1
DEMO_DIR ?= demo
demo: $(STAMP)
	$(BIN)/sasa-bench flops --paper
	$(BIN)/sasa-bench ablate $(STUDY) --seeds $(SEEDS) --results $(DEMO_DIR) --runs $(DEMO_DIR)/runs
	$(BIN)/sasa-bench report --results $(DEMO_DIR) --out $(DEMO_DIR)
	@echo "report: $(DEMO_DIR)/REPORT.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests only (CI runs them after `make test`).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

CPP_SOURCES := $(wildcard sasa_bench/csrc/*.cpp sasa_bench/csrc/*.h)

lint: $(STAMP)
	$(BIN)/ruff check sasa_bench tests
	$(BIN)/clang-format --dry-run --Werror $(CPP_SOURCES)

format-cpp: $(STAMP)
	$(BIN)/clang-format -i $(CPP_SOURCES)

# On a CUDA machine: every backend against the reference (forward, gradients, option matrix),
# then latency of sasa_resnet50 / sasa_resnet50_convstem vs resnet50 (fp32 and bf16
# channels-last, inference and train) into results/gpu-check/. Without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --out results/gpu-check

clean:
	rm -rf $(VENV) .pytest_cache
