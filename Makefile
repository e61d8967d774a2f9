# certkit: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,ray]'
	touch $@

test: install
	$(BIN)/ruff check certkit tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check certkit tests benchmarks

demo: install
	$(BIN)/certkit inspect models/mnist_cnn7_w8_eps0.4.onnx
	rm -rf demo_results.h5 demo_plots demo_report.html
	$(BIN)/certkit verify models/mnist_cnn7_w8_eps0.4.onnx --eps 0.1,0.2,0.3,0.4 \
		--dataset npz:data/mnist_test_100.npz --out demo_results.h5
	$(BIN)/certkit report demo_results.h5 --plots demo_plots --html demo_report.html

bench: install
	$(BIN)/python benchmarks/bounds_speed.py
	$(BIN)/python benchmarks/training_speed.py
	$(BIN)/python benchmarks/verify_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo_results.h5 demo_plots demo_report.html
