# Two entry points (see README): `make demo` and `make test`. Both set up .venv themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Install torch first, pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= train,mlx,wandb,dev

.PHONY: install demo test lint completions clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/swallowctl train -c examples/quickstart.yaml

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy swallowctl

test: lint
	$(PY) -m pytest -q

completions: $(VENV)/.installed
	$(PY) -m swallowctl.completion completions

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
