# The two commands: `make demo` (set up, run the default job) and `make test` (set up, run the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
JOB ?=
ARGS ?=

.PHONY: setup sysdeps demo test check bench clean
setup:
	@bash scripts/setup.sh

# Debian packages of the cluster tests (Slurm, munge, sshd): installed when root with apt, else those tests skip
sysdeps:
	@bash scripts/system_deps.sh

demo: setup
	$(VENV)/bin/enkg-dist run $(JOB) $(ARGS)

test: setup sysdeps
	$(PY) -m pytest tests $(ARGS)

check: setup
	$(PY) -m pytest tests -m "not slow and not cluster" $(ARGS)

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
