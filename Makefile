# The two commands of the README's quick start, and the pieces they share.
#   make train   set up .venv and train the paper's CIFAR-10 ResNet-20 (runs/cifar10_resnet20)
#   make test    set up .venv and run the tests
# REQUIRE=torch,tfds,grain,fashion_mnist,native makes those optional test groups install
# (torch, tfds, grain) and fail rather than skip when they cannot run; CI passes all five.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REQUIRE ?=
# The CPU build of torch; a plain `pip install torch` would fetch a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.py
WORKDIR ?= runs/cifar10_resnet20
# 1: install tensorflow-datasets (and tensorflow, to prepare a dataset the first time) for
# configs that read through TFDS; 0 for configs that read local files (Fashion-MNIST).
TFDS ?= 1

.PHONY: setup train summary test lint

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt -e .
	touch $@

train: setup
	$(if $(filter 1,$(TFDS)),$(BIN)/python -m pip install -q -e ".[tfds,tfds-prepare]")
	$(BIN)/python train.py --config=$(CONFIG) --workdir=$(WORKDIR)

summary: setup
	$(BIN)/python -m resnet_jax.summary

test: setup
	$(if $(findstring torch,$(REQUIRE)),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(if $(findstring tfds,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[tfds]")
	$(if $(findstring grain,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[stream]")
	$(BIN)/python -m pytest --require=$(REQUIRE)

lint: setup
	$(BIN)/ruff check .
