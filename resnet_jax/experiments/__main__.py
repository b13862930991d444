"""`python -m resnet_jax.experiments NAME --out DIR ...`; see resnet_jax/experiments/command.py."""

import sys

from resnet_jax.experiments.command import main

sys.exit(main())
