"""What `train.py` and `evaluate.py` share: flag parsing and how errors reach the user.

A user's mistake (a bad config key or value, missing data, a wrong workdir, a damaged
checkpoint) or a diverged run ends the command with one paragraph naming the problem and
exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import absl.logging
import jax

from resnet_jax import backend, parallel
from resnet_jax.checkpoint import WorkdirError
from resnet_jax.config import ConfigError
from resnet_jax.data.sources import DataError
from resnet_jax.parallel import DISTRIBUTED_MODES
from resnet_jax.preemption import ABORTED_EXIT_STATUS
from resnet_jax.train import TrainingDiverged

# Problems a user can act on: reported as one paragraph, not a traceback.
USER_ERRORS = (ConfigError, DataError, WorkdirError, TrainingDiverged)
OVERRIDE_PREFIX = "--config."


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusal of a flag is one paragraph, like every other user
    error here (argparse's own prints its usage block first, a screenful for train.py)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; `{self.prog} --help` lists the flags\n")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--config.KEY=VALUE` overrides (ml_collections style) from other flags."""
    rest, overrides = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith(OVERRIDE_PREFIX):
            rest.append(arg)
            continue
        key, sep, value = arg[len(OVERRIDE_PREFIX):].partition("=")
        if not sep:
            if not args:
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            value = args.pop(0)
        overrides.append((key, value))
    return rest, overrides


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (hosts); see docs/pods.md")
    group.add_argument("--distributed", default="off", choices=DISTRIBUTED_MODES,
                       help="auto: read the process layout from a TPU pod, SLURM or Kubernetes environment")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    group.add_argument("--num_processes", type=int, default=None)
    group.add_argument("--process_id", type=int, default=None)
    group.add_argument("--heartbeat_timeout", type=int, default=parallel.HEARTBEAT_TIMEOUT_SECONDS,
                       metavar="SECONDS", help="how long after a process stops answering the others stop")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Before anything touches a device: join the other processes, if any."""
    try:
        parallel.initialize_distributed(
            args.distributed, args.coordinator_address, args.num_processes, args.process_id,
            args.heartbeat_timeout,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def prepare_process() -> None:
    """What a command does first, before JAX starts its threads."""
    backend.keep_freed_memory_on_cpu()  # see cpu.allocator: XLA:CPU's scratch memory is reused
    # Orbax logs routine notes (read-only managers, ...) as warnings; keep the console for ours.
    absl.logging.set_verbosity(absl.logging.ERROR)


def run(main: Callable[[argparse.Namespace, list[tuple[str, str]]], Any],
        parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse flags and run `main(args, overrides)`, turning user errors into messages."""
    try:
        prepare_process()
        rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(rest)
        main(args, overrides)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError:  # where a process of the run died, it names it (docs/pods.md)
        parallel.await_lost_process_verdict()
        raise
    except KeyboardInterrupt:  # Ctrl-C outside training, where nothing is left to save (see preemption)
        print("\ninterrupted", file=sys.stderr)
        return ABORTED_EXIT_STATUS
    return 0
