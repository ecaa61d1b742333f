PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: venv test check clean

venv: $(VENV)/.stamp

# torch goes in first, pinned, so `pip install -e ".[dev]"` finds it satisfied and never picks another build.
$(VENV)/.stamp: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install -e ".[dev]"
	touch $@

# The one test command (README, .ci/run): lint, then the whole suite.
test: venv
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest -q

check: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
