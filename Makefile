# Two commands do everything on a fresh machine:
#   make demo   # venv + install + train/eval/sample on the embedded MNIST digits
#   make test   # venv + install (with test and tfds extras) + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
WORKDIR ?= runs/demo
# `make test-latest`: a separate venv with the newest releases the pins in
# setup.cfg allow (jax, flax, optax, orbax, ...), to find a release the pins
# admit but the code does not support before users do.
LATEST_VENV ?= .venv-latest
LATEST_TESTS ?= tests

.PHONY: demo test test-latest install install-test bench tcmalloc fashion-mnist clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test,tfds]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m vdm.main --config=configs/mnist5k.py --workdir=$(WORKDIR)

# The suite runs with the allocator `python -m vdm.main` preloads (mimalloc,
# else tcmalloc; vdm/runtime.py: faster XLA:CPU steps).
test: $(VENV)/.installed-test
	$(PY) -c 'from vdm import runtime; import shlex; print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in runtime.allocator_environment().items() if k == "LD_PRELOAD" or k.startswith("MIMALLOC_")))' > $(VENV)/.allocator-env
	. $(VENV)/.allocator-env && $(PY) -m pytest -q tests

# The suite against the newest jax/flax/optax/orbax the pins allow:
#   make test-latest                                  # the whole suite
#   make test-latest LATEST_TESTS="tests/test_elbo.py tests/test_model.py"
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
	  -e '.[test,tfds]'
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|chex) '
	$(LATEST_VENV)/bin/python -m pytest -q $(LATEST_TESTS)

# Train step, eval and sampling vs the official code (see README's results);
# peer_env.sh fetches the official code at its pinned commit when
# ../shared/peers is absent and applies experiments/official/official.patch.
bench: $(VENV)/.installed
	bash experiments/peer_env.sh
	$(PY) experiments/benchmark_train.py --preset tiny --batch_size 16
	$(PY) experiments/benchmark_eval.py --mode eval --preset tiny --batch_size 16
	$(PY) experiments/benchmark_eval.py --mode sample --preset tiny --batch_size 16

# Optional, Debian/Ubuntu (needs root): tcmalloc, the fallback allocator
# when mimalloc (a pip dependency on Linux) is missing.
tcmalloc:
	apt-get install -y libtcmalloc-minimal4

# Full Fashion-MNIST offline from Debian (needs root): see README.
fashion-mnist:
	apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs
