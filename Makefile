# mckmpi: `make demo` runs the main job, `make test` runs the full test suite.
# Both set the node up first (launch/setup: system packages, venv, parallel h5py).

VENV    ?= .venv
PY      := $(VENV)/bin/python
MPIEXEC := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 900 mpiexec --bind-to none

.PHONY: setup demo test test-serial test-mpi clean

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

clean:
	rm -rf $(VENV) .pytest_cache
