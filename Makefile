# mckmpi: `make demo` runs the main job, `make test` runs the full test suite.
# Both set the node up first (launch/setup: system packages, venv, parallel h5py).

VENV    ?= .venv
PY      := $(VENV)/bin/python
MPIEXEC := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 900 mpiexec --bind-to none

.PHONY: setup demo test test-serial test-mpi soak clean

setup:
	launch/setup

demo: setup
	$(VENV)/bin/mckmpi demo

test: setup test-serial test-mpi

test-serial:
	$(PY) -m pytest tests

# pytest-mpi: the tests marked `mpi` run inside every rank of a real MPI job.
test-mpi:
	$(MPIEXEC) -n 2 $(PY) -m pytest --with-mpi -m mpi -p no:cacheprovider -q tests
	$(MPIEXEC) -n 4 --oversubscribe $(PY) -m pytest --with-mpi -m mpi -p no:cacheprovider -q tests

# 64 ranks on two proxies, 10^4 offloaded operations each (minutes; not part of `make test`)
soak: setup
	mkdir -p results
	MCKMPI_SOAK_RECORD=results/soak.json $(PY) -m pytest -m soak -s -p no:cacheprovider tests/test_soak.py

clean:
	rm -rf $(VENV) .pytest_cache
