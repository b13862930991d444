"""The DALI input loader for GPU nodes (`dataset.loader = "dali"`): decode and resample
on the GPU, whose training step outruns the host's cores decoding for it (their rates:
benchmarks/RESULTS.md).

NVIDIA DALI (`pip install -e '.[dali]'`, imported only here) decodes the JPEGs with
nvJPEG (`device="mixed"`: on the GPU and its hardware decoder; `"cpu"` with libjpeg-turbo
on a machine without one, as in CI), only the region each view needs, and resizes, crops
and flips with its operators. The host only reads the files and works out, per sample,
which record it is and where its view lies (`data/dali_feed.py`, with the Grain path's
functions and draws). Per-pixel mean, per-channel std and PCA lighting are applied in the
compiled step, as for Grain (`stream.train_images`: one normalisation, fused by XLA into
the first convolution's input): DALI hands over uint8 views and each image's lighting
offset, a quarter of float32's bytes.

One DALI pipeline per device of this process, each fed its device's share of every batch
(`stream._Positions` over the devices: shard `index` of `num_devices` in mesh order, so
process p holds the shards of its devices, as `shard_id`/`num_shards` would say). Each
pipeline's views stay on its GPU (dlpack: no host copy; the few bytes of labels, masks and
offsets per image are copied from the host, as on the CPU, where everything is), and become
one global `jax.Array` per name with the mesh's batch sharding
(`jax.make_array_from_single_device_arrays`), what `nvidia.dali.plugin.jax`'s iterator does
with `sharding=`; this one is fed by the host's plan rather than by a DALI reader, which
is what makes a batch a function of (seed, step) and a resume exact.

`dataset.num_workers` is the host's DALI CPU threads (-1: as for Grain, the CPUs this
process may use, shared among the host's training processes; 0: one), split over its
pipelines; `dataset.prefetch_batches` is each pipeline's queue of prepared batches.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from resnet_jax.data import augment
from resnet_jax.data.dali_feed import EvalFeed, TrainFeed
from resnet_jax.data.image_records import open_splits
from resnet_jax.data.sources import DataError
from resnet_jax.data.stream import (
    Normalization,
    StreamedBatch,
    _Positions,
    _RecordBucket,
    _Settings,
    auto_workers,
    multi_scale_order,
    normalization_sample,
)
from resnet_jax.parallel import Parallel, eval_batch_size_for, gather_from_processes

INSTALL = "pip install -e '.[dali]'"
GRAIN_INSTEAD = "--config.dataset.loader=grain (evaluate.py: --loader=grain)"
# Batches of the normalisation sample's center crops (`stream.NORMALIZATION_SAMPLE` images).
_SAMPLE_BATCH = 64


def _dali():
    """The DALI modules, or a DataError naming the install command."""
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as error:
        raise DataError(
            f"dataset.loader = 'dali' needs NVIDIA DALI, which cannot be imported here ({error}). Install "
            f"it with {INSTALL} (DALI's CUDA 12 build, for Linux on x86-64 or ARM; it also decodes on the "
            f"CPU), or use the default loader: {GRAIN_INSTEAD}"
        ) from None
    return dali, fn, types


def decoder_device(platform: str) -> str:
    """Where DALI decodes for a JAX backend: "mixed" (nvJPEG) on a GPU, "cpu" on the CPU;
    refused on a TPU, whose hosts Grain feeds."""
    if platform == "gpu":
        return "mixed"
    if platform == "cpu":
        return "cpu"
    raise DataError(
        f"dataset.loader = 'dali' decodes on NVIDIA GPUs (or the CPU), and this run's devices are "
        f"{platform.upper()}s: on them the host pipeline is the loader, {GRAIN_INSTEAD}"
    )


def _decoded(fn, types, encoded, anchor, shape, device: str):
    """The region (anchor, shape: (y, x)) of each encoded image, decoded to RGB; orientation
    as stored (Pillow, which the Grain path and the header sizes use, ignores EXIF)."""
    return fn.decoders.image_slice(encoded, anchor, shape, device=device, output_type=types.RGB,
                                   axis_names="HW", adjust_orientation=False, jpeg_fancy_upsampling=True)


def _train_graph(fn, types, feed: TrainFeed, s: _Settings, device: str) -> dict:
    encoded, anchor, shape, roi_start, roi_end, label, lighting = fn.external_source(
        source=feed, num_outputs=len(feed.OUTPUTS), batch=True, batch_info=True)
    image = fn.resize(_decoded(fn, types, encoded, anchor, shape, device), size=(s.image_size, s.image_size),
                      roi_start=roi_start, roi_end=roi_end, antialias=True)
    return {"image": image, "label": label, "lighting": lighting}


def _eval_graph(fn, types, feed: EvalFeed, s: _Settings, device: str) -> dict:
    """The views of `feed.mode` (`augment.center_crop`, `ten_crops`, `multi_scale_views`)."""
    inputs = dict(zip(feed.OUTPUTS[feed.mode], fn.external_source(
        source=feed, num_outputs=len(feed.OUTPUTS[feed.mode]), batch=True, batch_info=True), strict=True))
    tail = {"label": inputs["label"], "mask": inputs["mask"]}
    size = s.image_size
    if feed.mode == "center":
        image = _decoded(fn, types, inputs["encoded"], inputs["anchor"], inputs["shape"], device)
        views = fn.resize(image, size=(size, size), roi_start=inputs["roi_start"], roi_end=inputs["roi_end"],
                          antialias=True)
        return {"views": views, **tail}
    if feed.mode == "ten_crop":
        image = fn.decoders.image(inputs["encoded"], device=device, output_type=types.RGB,
                                  adjust_orientation=False, jpeg_fancy_upsampling=True)
        resized = fn.resize(image, size=inputs["size"], antialias=True)
        crops = [fn.slice(resized, inputs["corners"][k], [size, size], axis_names="HW") for k in range(5)]
        return {"views": fn.stack(*crops, *(fn.flip(crop, horizontal=1) for crop in crops)), **tail}
    image = _decoded(fn, types, inputs["encoded"], inputs["anchor"], inputs["shape"], device)
    views = {}
    for k in range(len(s.multi_scale_sizes)):
        resized = fn.resize(image, size=inputs["sizes"][k], antialias=True)
        views[f"views_{k}"] = fn.pad(fn.stack(resized, fn.flip(resized, horizontal=1)), axes=(1, 2),
                                     shape=inputs["canvases"][k])
    return {**views, "valid": inputs["valid"], **tail}


def _to_jax(tensors, device: jax.Device) -> jax.Array:
    """A pipeline output (a batch of equal-shaped samples) as an array on `device`: views
    decoded on this GPU wrap DALI's memory (dlpack); outputs in host memory (the CPU's views,
    and the labels, masks, offsets and sizes the host fed in) are copied there."""
    from nvidia.dali.tensors import TensorListGPU

    if isinstance(tensors, TensorListGPU):
        return jax.dlpack.from_dlpack(tensors.as_tensor(), device=device)
    return jax.device_put(tensors.as_array(), device)


class DeviceBatches:
    """Global batches of `batch_size` from one DALI pipeline per device of this process:
    pipeline `graph(feed_for(positions))` decodes its device's share of each batch
    (`positions`: shard `index` of `num_devices`). Iterating yields {name: jax.Array with
    the mesh's batch sharding}; multi-scale's "views_k" come as the tuple "views"."""

    def __init__(self, graph: Callable, feed_for: Callable[[_Positions], Callable], batch_size: int,
                 parallel: Parallel, threads: int, prefetch: int, settings: _Settings):
        dali, fn, types = _dali()
        self.batch_size, self.sharding = batch_size, parallel.batch
        shards = parallel.batch.addressable_devices_indices_map((batch_size,))
        first_row = {device: rows.indices(batch_size)[0] for device, (rows,) in shards.items()}
        per_device = batch_size // parallel.num_devices
        self.devices = sorted(first_row, key=first_row.get)
        device_kind = decoder_device(self.devices[0].platform)
        self.pipelines, self.names = [], None
        for device in self.devices:
            positions = _Positions(batch_size, first_row[device] // per_device, parallel.num_devices)
            try:
                pipeline = dali.Pipeline(
                    batch_size=per_device, num_threads=max(1, threads // len(self.devices)),
                    device_id=device.local_hardware_id if device.platform == "gpu" else None,
                    prefetch_queue_depth=prefetch, exec_dynamic=True)
                with pipeline:
                    outputs = graph(fn, types, feed_for(positions), settings, device_kind)
                    pipeline.set_outputs(*outputs.values())
                pipeline.build()  # where CUDA and the decoders start
            except RuntimeError as error:
                raise DataError(
                    f"DALI could not start its pipeline on {device} ({str(error).splitlines()[0][:300]}); "
                    f"{INSTALL} installs DALI's CUDA 12 build, which needs an NVIDIA driver for CUDA 12, or "
                    f"use the default loader: {GRAIN_INSTEAD}"
                ) from None
            self.pipelines.append(pipeline)
            self.names = list(outputs)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        outputs = [pipeline.run() for pipeline in self.pipelines]
        batch, views = {}, []
        for k, name in enumerate(self.names):
            parts = [_to_jax(output[k], device) for output, device in zip(outputs, self.devices, strict=True)]
            array = jax.make_array_from_single_device_arrays(
                (self.batch_size, *parts[0].shape[1:]), self.sharding, parts)
            if name.startswith("views_"):
                views.append(array)
            else:
                batch[name] = array
        return {"views": tuple(views), **batch} if views else batch

    def close(self) -> None:
        self.pipelines = []  # DALI stops a pipeline's threads when it is freed


class DaliData:
    """A streamed dataset read through DALI: the splits, opened and checked before anything
    is compiled, and the normalisation statistics of its training images, with the
    interface of `stream.StreamedData` (what `train.StreamInputs` uses)."""

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel, roles: tuple[str, ...]):
        _dali()  # refuse early, with how to install it
        decoder_device(parallel.mesh.devices.flat[0].platform)  # and on devices DALI does not feed
        d = config.dataset
        self.config, self.parallel = config, parallel
        self.settings = _Settings.of(config)
        self.train, self.eval = open_splits(d, roles)
        self.num_classes = self.train.num_classes
        self.threads = auto_workers() if d.num_workers == -1 else max(d.num_workers, 1)
        self.normalization = self._normalization()

    def _batches(self, graph: Callable, feed_for: Callable, batch_size: int,
                 parallel: Parallel) -> DeviceBatches:
        return DeviceBatches(graph, feed_for, batch_size, parallel, self.threads,
                             self.config.dataset.prefetch_batches, self.settings)

    def _normalization(self) -> Normalization:
        """From the center crops of the sample of training images the Grain path takes,
        decoded by a pipeline on this process's first device."""
        sample = normalization_sample(self.settings.seed, len(self.train))
        first = Parallel(jax.sharding.Mesh(np.asarray(self.parallel.mesh.local_devices[:1]), ("data",)))
        batches = self._batches(
            _eval_graph, lambda positions: EvalFeed(self.train, sample, self.settings, "center", positions),
            _SAMPLE_BATCH, first)
        try:
            images = []
            for batch in itertools.islice(batches, -(-len(sample) // _SAMPLE_BATCH)):
                views, mask = np.asarray(batch["views"]), np.asarray(batch["mask"])
                images.append(views[mask])
        finally:
            batches.close()
        images = np.concatenate(images)
        if not len(images):
            raise DataError(f"no readable image among {len(sample)} sampled from the training split")
        mean, std = augment.normalization_stats(images, self.config.dataset.normalization)
        put = lambda a: jax.make_array_from_process_local_data(self.parallel.replicated, a)  # noqa: E731
        return Normalization(put(mean), put(std))

    @property
    def eval_batch_size(self) -> int:
        return eval_batch_size_for(self.config.eval_batch_size, len(self.eval), self.parallel.num_devices)

    @contextlib.contextmanager
    def train_batches(self, start_step: int) -> Iterator[Iterator[StreamedBatch]]:
        """The inputs of the training steps from `start_step` on."""
        batches = self._batches(
            _train_graph, lambda positions: TrainFeed(self.train, self.settings, positions, start_step),
            self.config.batch_size, self.parallel)
        try:
            yield (StreamedBatch(batch, self.normalization) for batch in batches)
        finally:
            batches.close()

    def multi_scale_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(records, buckets) by position, as `stream.StreamedData.multi_scale_plan`: each
        of the P processes reads the sizes of 1/P of the records from their headers."""
        n = len(self.eval)
        block = -(-n // jax.process_count())
        first = min(jax.process_index() * block, n)
        bucket_of = _RecordBucket(self.eval, self.settings.skip_unreadable)
        mine = range(first, min(first + block, n))
        found = np.full(block, -1, np.int32)  # past the end: cut off below
        found[:len(mine)] = [bucket_of(index) for index in mine]
        return multi_scale_order(gather_from_processes(found)[:n], self.eval_batch_size)

    def eval_batch_like(self, mode: str) -> StreamedBatch | None:
        """An eval step's input in `mode` as shapes and shardings (None for multi-scale,
        whose canvases vary by batch)."""
        if mode == "multi_scale":
            return None
        size, n = self.settings.image_size, self.eval_batch_size
        views = (n, size, size, 3) if mode == "center" else (n, 10, size, size, 3)
        like = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.parallel.batch)  # noqa: E731
        batch = {"views": like(views, np.uint8), "label": like((n,), np.int32), "mask": like((n,), np.bool_)}
        return StreamedBatch(batch, self.normalization)

    @contextlib.contextmanager
    def eval_passes(self, mode: str) -> Iterator[Callable[[], Iterator[StreamedBatch]]]:
        """`one_pass()` -> the inputs of one evaluation, as `stream.StreamedData.eval_passes`:
        every record once as `mode` views, padding masked; the pipelines start at the first
        pass and serve every later one (each takes exactly its own batches)."""
        batch_size = self.eval_batch_size
        if mode == "multi_scale":
            records, buckets = self.multi_scale_plan()
        else:
            records, buckets = np.arange(len(self.eval)), None
        num_batches = -(-len(records) // batch_size)
        batches = None

        def one_pass() -> Iterator[StreamedBatch]:
            nonlocal batches
            if batches is None:
                batches = self._batches(
                    _eval_graph,
                    lambda positions: EvalFeed(self.eval, records, self.settings, mode, positions, buckets),
                    batch_size, self.parallel)
            return (StreamedBatch(batch, self.normalization)
                    for batch in itertools.islice(batches, num_batches))

        try:
            yield one_pass
        finally:
            if batches is not None:
                batches.close()
