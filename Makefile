# nasweb: `make run` (set up + run the dashboard with a live worker), `make test` (set up + run the tests).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# Extra pip options, e.g. TORCH_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu" on a machine
# without a local torch wheel, so pip does not fetch the multi-GB CUDA build.
TORCH_PIP_OPTS ?=
STAMP := $(VENV)/.nasweb-installed

.PHONY: install run test lint bootstrap worker web

$(STAMP): requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: nothing installed afterwards may replace it (constraints.txt pins it too).
	$(PY) -m pip install -q $(TORCH_PIP_OPTS) torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	# scalesim's declared numba/pandas/matplotlib are unused by what we call; tqdm is its only real need.
	$(PY) -m pip install -q --no-deps scalesim==3.0.0
	$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else 'torch ' + torch.__version__ + ' installed, 2.13.0 required')"
	@touch $@

install: $(STAMP)

run: install
	$(PY) -m nasweb.launcher --port $(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Migrations, admin account and built-in devices (idempotent; `make run` does this itself).
bootstrap: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py bootstrap

# The two processes `make run` starts, for running them separately (e.g. docker-compose, a GPU box with -Q train).
worker: install
	$(PY) -m celery -A nasweb worker -Q $${NASWEB_WORKER_QUEUES:-default,train,profile,adapt} -c $${NASWEB_WORKER_CONCURRENCY:-1} --loglevel INFO

web: install
	$(PY) -m nasweb.serve --host $${NASWEB_HOST:-127.0.0.1} --port $(PORT)
