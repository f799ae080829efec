# make demo: the embedded default end to end, offline, on a laptop CPU.
# make test: the test suite (CPU, no network, tiny random models).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
# No GPU: take torch 2.13.0 first (a CPU wheel is on these machines), so that the requirements below
# don't pull a multi-GB CUDA build. With a GPU, install the torch you want before `make install`.
TORCH   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: install install-test test test-gpu demo demo-d2o demo-d2o-long demo-tasks data teacher clean

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
		else rm -rf $(DEMO)/d2o-1step; echo "D2O: no $(D2O_UNET) yet; 'make demo-d2o' trains it (about 13 min on 2 cores)"; fi
	$(PY) eval_fid.py --gen=$(DEMO)/teacher-15step,$(DEMO)/base-1step,$(DEMO)/hipa-1step$(shell [ -d $(D2O_UNET) ] && echo ,$(DEMO)/d2o-1step) \
		--paired=$(DEMO)/teacher-15step --out=$(DEMO)/metrics.json
	@echo "pictures: $(DEMO)/compare.png (rows: teacher 15-step | base 1-step | HiPA 1-step),"
	@echo "          $(DEMO)/metrics_spectrum.png, out/hipa-fmnist/val_*.png"
	@echo "numbers:  $(DEMO)/metrics.json (the table above), out/hipa-fmnist/log.jsonl"

# D2O on the tiny teacher (400 steps at ~1.8 s each, 13 minutes on 2 idle cores, with a learning curve in out/d2o-fmnist/curve.png);
# `make demo` then adds it to its table.
demo-d2o: data
	$(PY) d2o.py config/fmnist_d2o.py --overwrite=True

# The config at the paper's G lr and batch (256 = 8 micro-batches of 32, as its 8 GPUs x 32) to its first budget,
# 0.2 M images (782 steps, about 3 h on 2 idle cores: 601 steps took 2 h 21 min), a curve point every 12.8k images
# (out/d2o-fmnist-b256/curve.png; docs/d2o.md, "The paper's batch"). Resumable: run it again and it continues.
D2O_LONG := $(PY) d2o.py config/fmnist_d2o.py --g_lr=1e-4 --batch_size=256 --grad_accum=8 --max_iters=782 \
	--curve_interval=50 --ckpt_interval=25 --out_dir=out/d2o-fmnist-b256
demo-d2o-long: data
	@if [ -f out/d2o-fmnist-b256/ckpt.pt ]; then $(D2O_LONG) --init_from=resume; else $(D2O_LONG); fi

# HiPA's other tasks (paper 4.2-4.4) on the tiny task teachers in assets/, each on the same 500 Fashion-MNIST test
# images: editing (SDEdit at strength $(STRENGTH) with the t2i model and its adaptor, trained first if absent, and
# with an adaptor trained for editing: an extension),
# inpainting (the paper's 50% peripheral mask), x4 super-resolution (8 -> 32). Per task: teacher 15 and 25 steps,
# base 1 step, HiPA 1 step, evaluated against the test set (FID, caption accuracy) and the ground truth (RMSE; for
# editing: the input).
TASKS := out/demo-tasks
COMMA := ,
# Editing is text-guided: each test image with the caption of another class (caption accuracy then scores the
# edit), at diffusers img2img's default strength.
STRENGTH := 0.8
LORA_EDIT := out/hipa-fmnist-edit/pytorch_lora_weights.safetensors
LORA_INPAINT := out/hipa-fmnist-inpaint/pytorch_lora_weights.safetensors
LORA_X4 := out/hipa-fmnist-x4/pytorch_lora_weights.safetensors
TSAMPLE := $(PY) sample.py --skip_existing=False --grid=False --batch_size=100 --guidance=2.0
# $(call task_table,OUT,MODEL ARGS,INPUTS,LORA,GROUND TRUTH[,BASELINE FOLDER + ','][,',' + MORE ROWS])
# The table's first row is the ground truth itself: the floor of FID(fmnist-clf) at 500 images.
define task_table
	$(TSAMPLE) $(2) --init_images=$(3) --steps=15 --out_dir=$(1)/teacher-15step
	$(TSAMPLE) $(2) --init_images=$(3) --steps=25 --out_dir=$(1)/teacher-25step
	$(TSAMPLE) $(2) --init_images=$(3) --steps=1 --out_dir=$(1)/base-1step
	$(TSAMPLE) $(2) --init_images=$(3) --steps=1 --lora=$(4) --out_dir=$(1)/hipa-1step
	$(TSAMPLE) $(2) --init_images=$(3) --lora=$(4) --compare=True --teacher_steps=25 --out_dir=$(1)
	$(PY) eval_fid.py --gen=$(5),$(6)$(1)/teacher-15step,$(1)/teacher-25step,$(1)/base-1step,$(1)/hipa-1step$(7) \
		--paired=$(5) --out=$(1)/metrics.json
endef
demo-tasks: data
	@[ -f $(LORA) ] || $(PY) hipa.py config/fmnist_hipa.py --overwrite=True
	$(PY) hipa.py config/fmnist_hipa_edit.py --strength=$(STRENGTH) --overwrite=True
	$(PY) hipa.py config/fmnist_hipa_inpaint.py --overwrite=True
	$(PY) hipa.py config/fmnist_hipa_x4.py --overwrite=True
	$(PY) -c 'import common; common.export_split("data/fmnist", "test", 500, "$(TASKS)/truth"); \
		common.export_split("data/fmnist", "test", 500, "$(TASKS)/edit-input", other_class=True); \
		common.export_split("data/fmnist", "test", 500, "$(TASKS)/low-res", factor=4); \
		common.export_split("data/fmnist", "test", 500, "$(TASKS)/bicubic", factor=4, bicubic_up=True)'
	$(TSAMPLE) --model=assets/tiny-sd-fmnist --strength=$(STRENGTH) --init_images=$(TASKS)/edit-input --steps=1 \
		--lora=$(LORA_EDIT) --out_dir=$(TASKS)/edit/hipa-edit-1step
	$(call task_table,$(TASKS)/edit,--model=assets/tiny-sd-fmnist --strength=$(STRENGTH),$(TASKS)/edit-input,$(LORA),$(TASKS)/edit-input,,$(COMMA)$(TASKS)/edit/hipa-edit-1step)
	$(call task_table,$(TASKS)/inpaint,--model=assets/tiny-sd-fmnist-inpaint --mask=periphery,$(TASKS)/truth,$(LORA_INPAINT),$(TASKS)/truth)
	$(call task_table,$(TASKS)/x4,--model=assets/tiny-sd-fmnist-x4,$(TASKS)/low-res,$(LORA_X4),$(TASKS)/truth,$(TASKS)/bicubic$(COMMA))
	@echo "tables: $(TASKS)/{edit,inpaint,x4}/metrics.json; grids: $(TASKS)/{edit,inpaint,x4}/compare.png"
	@echo "        (rows: input | teacher 25-step | base 1-step | HiPA 1-step)"

clean:
	rm -rf out
