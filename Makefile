# The two commands of the README: `make run` and `make test`. Both create the interpreter's venv on first use.
# PYTHON=pypy3 runs both on PyPy; each interpreter has a venv of its own (.venv for python3, .venv-pypy3 for
# pypy3, .venv-python3.12 for python3.12, ...), so switching never breaks the other.
PYTHON ?= python3
VENV   ?= $(if $(filter python3,$(notdir $(PYTHON))),.venv,.venv-$(notdir $(PYTHON)))
BIN    := $(VENV)/bin
PORT   ?= 5050
# Wheels before newer source releases: on PyPy the newest cryptography and matplotlib come as source only, which
# would need a Rust or C toolchain to build. Harmless on CPython, where every dependency has wheels.
export PIP_PREFER_BINARY := 1
export PIP_ONLY_BINARY := cryptography
# PyPy's GC nursery, larger than the one it picks from the L2 cache: about 1.7x the keep-alive rate for ~75 MB
# more memory (docs/operations.md#on-pypy). CPython ignores it.
PYPY_GC_NURSERY ?= 16MB
export PYPY_GC_NURSERY

.PHONY: run test test-slow bench bench-loadgen bench-path bench-instructions bench-hostile clean

# The venv is set up under a lock (util-linux's flock), so that `make run` and `make test` started together do
# not race inside pip: whoever waited finds the work done (its stamp newer than what it depends on) and goes on.
LOCKED := flock $(VENV).lock sh -ec
STALE   = stale=; for source in $^; do [ -f $@ ] && [ $@ -nt $$source ] || stale=1; done; [ -z "$$stale" ]

# The service alone, for `make run`.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(LOCKED) '$(STALE) || { \
	  $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --quiet --upgrade pip; \
	  $(BIN)/python -m pip install --quiet -e .; \
	  touch $@; }'

# Plus the test tools and the report charts.
$(VENV)/.installed-test: $(VENV)/.installed
	$(LOCKED) '$(STALE) || { \
	  $(BIN)/python -m pip install --quiet -e ".[test,report]"; \
	  touch $@; }'

run: $(VENV)/.installed
	$(BIN)/twistd -n --pidfile= primecount --port $(PORT)

# Four test processes on two cores: many tests wait on real time (deadlines, quiet gaps, a server's start), and
# four keep both cores busy through those waits. `make test` runs every test but the slow end-to-end ones
# (marked @slow: real HAProxy, systemd, Prometheus, JMeter, load through real processes), which `make test-slow`
# runs; CI runs both, on both interpreters. `trial tests` alone runs everything.
# After the tests, one line names any tool the tests need that is missing here (their tests skipped).
test: $(VENV)/.installed-test
	PRIMECOUNT_SKIP_SLOW=1 $(BIN)/trial -j4 tests; status=$$?; $(BIN)/python -m tests.toolcheck; exit $$status

test-slow: $(VENV)/.installed-test
	$(BIN)/trial -j4 $$($(BIN)/python -m tests.slowtests); status=$$?; $(BIN)/python -m tests.toolcheck; exit $$status

# The JMeter plan at 1, 10 and 50 threads against a fresh server each time (needs JMeter).
bench: $(VENV)/.installed-test
	$(BIN)/python -m primecount.tools.loadtest bench --out jmeter-results/bench

# Every bench-* target below runs from a fresh clone: the load generator is the project's own (contrib/loadgen,
# built with cc into a temporary folder that is removed afterwards). Servers measured beside primecount that live
# outside the project (the original server, the uvloop peers, a minimal C server: ../shared/tools beside the
# checkout) are run when they are there and skipped, said once, when not.

# Side-by-side figures against the original server: pinned (server on core 0, load on core 1: cost per core),
# then unpinned (as deployed).
bench-loadgen: $(VENV)/.installed-test
	$(BIN)/python contrib/bench/loadgen_compare.py
	$(BIN)/python contrib/bench/loadgen_compare.py --unpinned

# The request path beside the original server, the framework's floor and the uvloop peers, pinned then
# unpinned. The peers want uvloop: PEER_PYTHON is a Python that has it (a scratch venv, not this one), else
# they are skipped.
# PYTHONS: the interpreters primecount runs on, side by side (e.g. ".venv/bin/python .venv-pypy3/bin/python").
PEER_PYTHON ?= $(PYTHON)
PYTHONS ?= $(BIN)/python
PATH_ARGS = --peer-python $(PEER_PYTHON) $(addprefix --python ,$(PYTHONS)) --server-env PYPY_GC_NURSERY=$(PYPY_GC_NURSERY)
bench-path: $(VENV)/.installed-test
	$(BIN)/python contrib/bench/request_path.py $(PATH_ARGS)
	$(BIN)/python contrib/bench/request_path.py $(PATH_ARGS) --unpinned

# Instructions per request under callgrind (needs valgrind): the request path's cost without machine noise.
bench-instructions: $(VENV)/.installed-test
	$(BIN)/python contrib/bench/instructions.py --peer-python $(PEER_PYTHON)

# Real clients with and without slowloris-style and 10,000 idle clients, and the server's memory.
bench-hostile: $(VENV)/.installed-test
	$(BIN)/python contrib/bench/hostile.py

clean:
	rm -rf $(VENV) $(VENV).lock .venv-* build dist *.egg-info _trial_temp twisted/plugins/dropin.cache jmeter-results
