# certkit: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test test-slow lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

test: install
	$(BIN)/ruff check certkit tests benchmarks
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check certkit tests benchmarks

demo: install
	$(BIN)/certkit inspect models/mnist_demo.onnx
	$(BIN)/certkit bounds models/mnist_demo.onnx --center models/mnist_demo_x.npy --eps 0.01 --clip 0,1 \
		--label 7 --method crown --out demo_bounds.npz

bench: install
	$(BIN)/python benchmarks/bounds_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo_bounds.npz
