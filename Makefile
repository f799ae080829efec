# make demo: the embedded default end to end, offline, on a laptop CPU.
# make test: the test suite (CPU, no network, tiny random models).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
# No GPU: take torch 2.13.0 first (a CPU wheel is on these machines), so that the requirements below
# don't pull a multi-GB CUDA build. With a GPU, install the torch you want before `make install`.
TORCH   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: install install-test test test-gpu demo demo-d2o data teacher clean

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

# On a CUDA machine: the trainers under torchrun (NCCL, bf16, eager and Inductor), half-precision sampling.
test-gpu: install-test
	$(PY) -m pytest -q tests/test_cuda.py -rs

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

# The embedded default end to end: HiPA on the tiny teacher (about 10 minutes), then 500 images each from the
# teacher (15 steps), the base model (1 step), HiPA (1 step) and, once `make demo-d2o` has trained it, D2O
# (1 step), all from the same noise, evaluated against the Fashion-MNIST test set and the teacher's images.
DEMO := out/demo
LORA := out/hipa-fmnist/pytorch_lora_weights.safetensors
D2O_UNET := out/d2o-fmnist/unet
SAMPLE := $(PY) sample.py config/fmnist_sample.py --skip_existing=False --grid=False
demo: data
	$(PY) hipa.py config/fmnist_hipa.py --overwrite=True
	$(SAMPLE) --steps=15 --out_dir=$(DEMO)/teacher-15step
	$(SAMPLE) --steps=1 --out_dir=$(DEMO)/base-1step
	$(SAMPLE) --steps=1 --lora=$(LORA) --out_dir=$(DEMO)/hipa-1step
	$(SAMPLE) --lora=$(LORA) --compare=True --out_dir=$(DEMO)
	@if [ -d $(D2O_UNET) ]; then $(SAMPLE) --steps=1 --guidance=1 --unet=$(D2O_UNET) --out_dir=$(DEMO)/d2o-1step; \
		else rm -rf $(DEMO)/d2o-1step; echo "D2O: no $(D2O_UNET) yet; 'make demo-d2o' trains it (about 25 min)"; fi
	$(PY) eval_fid.py --gen=$(DEMO)/teacher-15step,$(DEMO)/base-1step,$(DEMO)/hipa-1step$(shell [ -d $(D2O_UNET) ] && echo ,$(DEMO)/d2o-1step) \
		--paired=$(DEMO)/teacher-15step --out=$(DEMO)/metrics.json
	@echo "pictures: $(DEMO)/compare.png (rows: teacher 15-step | base 1-step | HiPA 1-step),"
	@echo "          $(DEMO)/metrics_spectrum.png, out/hipa-fmnist/val_*.png"
	@echo "numbers:  $(DEMO)/metrics.json (the table above), out/hipa-fmnist/log.jsonl"

# D2O on the tiny teacher (about 25 minutes on 2 CPU cores); `make demo` then adds it to its table.
demo-d2o: data
	$(PY) d2o.py config/fmnist_d2o.py --overwrite=True

clean:
	rm -rf out
