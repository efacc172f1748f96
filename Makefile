# The two commands a new user needs: `make demo` and `make test`. Both create .venv and install
# what they need by themselves, and are safe to run again.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch pin for machines without a GPU; `make install CONSTRAINTS=` on a CUDA machine.
CONSTRAINTS ?= constraints/cpu.txt
CFLAGS_PIP := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
EXTRAS ?= test,all
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) 2>/dev/null | sha256sum | cut -c1-12)
LAKE ?= ./lakehouse
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?= --durations=25

export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export SPARK_LOCAL_IP ?= 127.0.0.1

.PHONY: install test demo bench bench-gpu clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q $(CFLAGS_PIP) -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/imagelake --lake $(LAKE) demo --host $(HOST) --port $(PORT)

bench: install
	$(PY) tests/bench/run_all.py

# The GPU path in one script, < 5 min on one GPU; on a CUDA machine:
#   make bench-gpu CONSTRAINTS= EXTRAS=gpu,test     (prints "no GPU" and exits 0 elsewhere)
bench-gpu: install
	$(PY) tests/bench/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
