# cp2image: `make demo` installs everything and runs the demo; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cp2image-installed

.PHONY: install demo test lint bench train-default train-realistic clean-demo gui-setup gui-screenshots

install: $(STAMP)

$(STAMP): setup.py requirements-cellprofiler.txt scripts/install.sh
	bash scripts/install.sh
	@touch $@

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/generator_throughput.py
	$(PY) benchmarks/module_overhead.py
	$(PY) benchmarks/synthesis_path.py --batch-size 64 256
	$(PY) benchmarks/pytorch_options.py
	$(PY) benchmarks/analysis_workers.py
	$(PY) benchmarks/training_throughput.py

train-default: $(STAMP)
	bash scripts/train_default.sh

train-realistic: $(STAMP)
	bash scripts/train_realistic.sh

gui-setup: $(STAMP)
	bash scripts/gui_setup.sh

gui-screenshots: gui-setup
	bash scripts/gui_screenshots.sh

clean-demo:
	rm -rf output/demo
