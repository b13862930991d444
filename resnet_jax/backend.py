"""What training does differently on the CPU backend: the convolution path, its compiler
options and the allocator setting; on GPU and TPU, none of it.

On the CPU backend the model's convolutions take the `resnet_jax.cpu.fast_conv` path
that the config key `model.conv` names ("auto", "xla"), jit compiles with
that path's XLA options, and glibc keeps freed memory (`resnet_jax.cpu.allocator`). On
GPU and TPU the model gets Flax's plain `nn.Conv`, jit no options, and the allocator is
left alone, whatever the config says. The models never import this module: the
training side builds them with the convolution module chosen here (`state.build_model`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax

from resnet_jax.cpu import allocator, fast_conv, native_conv

# The values of the config key model.conv.
CONV_PATHS = fast_conv.CONV_PATHS
# Environment variables that hand JAX a plugin library directly.
PLUGIN_VARIABLES = ("PJRT_NAMES_AND_LIBRARY_PATHS", "TPU_LIBRARY_PATH")


def user_cache_dir() -> os.PathLike[str]:
    """The per-user folder where resnet_jax keeps what it builds and measures on this
    machine (the native kernels, the convolution choices; `compile_cache`'s default)."""
    return native_conv.cache_dir()


def conv_module(path: str) -> Any:
    """What builds the model's convolution layers for `path` (one of `CONV_PATHS`): Flax's
    plain `nn.Conv` wherever `fast_conv` gives XLA's own convolution ("xla", other backends)."""
    conv_general_dilated = fast_conv.conv_general_dilated_for(path)
    if conv_general_dilated is lax.conv_general_dilated:
        return nn.Conv
    return functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def compiler_options(path: str) -> dict[str, str]:
    """The XLA options to jit a computation of a model built by `conv_module(path)` with
    (none off the CPU backend: `fast_conv.compiler_options` decides)."""
    return fast_conv.compiler_options(path)


def cpu_backend_expected(platforms: str | None, accelerator_plugins: Sequence[str]) -> bool:
    """Whether JAX will run on the CPU, from its `jax_platforms` setting (JAX_PLATFORMS) and
    the GPU/TPU plugins installed. JAX prefers the first listed platform, else any plugin's
    device over the CPU; a plugin installed on a host without its device counts as that
    device (the allocator is then left alone: JAX_PLATFORMS=cpu says otherwise)."""
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugins


def installed_accelerator_plugins() -> list[str]:
    """The GPU/TPU plugins JAX would load (read from the installed packages and the
    environment, as JAX finds them, without loading any)."""
    plugins = [entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")]
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        found = pkgutil.iter_modules(namespace.submodule_search_locations)
        plugins += [f"jax_plugins.{module.name}" for module in found]
    if importlib.util.find_spec("libtpu") is not None:
        plugins.append("libtpu")
    plugins += [f"${name}" for name in PLUGIN_VARIABLES if os.environ.get(name)]
    return sorted(set(plugins))


def keep_freed_memory_on_cpu() -> bool:
    """`allocator.keep_freed_memory()` where JAX will run on the CPU; whether it was applied.

    Decided without starting a backend: the setting reaches only threads started after it,
    so this runs before JAX's first use of a device.
    """
    if not cpu_backend_expected(jax.config.jax_platforms, installed_accelerator_plugins()):
        return False
    return allocator.keep_freed_memory()
