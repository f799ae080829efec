# make demo: the embedded default end to end, offline, on a laptop CPU.
# make test: the test suite (CPU, no network, tiny random models).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
# No GPU: take torch 2.13.0 first (a CPU wheel is on these machines), so that the requirements below
# don't pull a multi-GB CUDA build. With a GPU, install the torch you want before `make install`.
TORCH   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: install install-test test demo data teacher clean

.venv/bin/python:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

.venv/.installed: .venv/bin/python requirements.txt
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -r requirements.txt
	touch $@

.venv/.installed-test: .venv/.installed requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: .venv/.installed
install-test: .venv/.installed-test

test: install-test
	$(PY) -m pytest -q tests

# Fashion-MNIST from Debian's package where apt is available (prepare_fmnist.py downloads it otherwise).
data/fmnist/meta.json: prepare_fmnist.py | install
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) \
		|| echo "could not apt-get dataset-fashion-mnist; prepare_fmnist.py will try to download"; fi
	$(PY) prepare_fmnist.py

data: data/fmnist/meta.json

# Retrain the shipped teacher (about an hour on 2 CPU cores); `make demo` uses assets/ and does not need this.
teacher: data
	$(PY) pretrain.py config/fmnist_pretrain.py

demo: data
	$(PY) demo.py

clean:
	rm -rf out
