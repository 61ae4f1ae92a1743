# Two commands set everything up on a fresh machine:
#   make train   # venv + pinned deps + train the demo model on the built-in digits data
#   make test    # venv + pinned deps + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test bench lock clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/t2t-vit train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable > requirements.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
