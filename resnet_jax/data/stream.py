"""Large datasets (ImageNet) streamed by a host pipeline into the devices.

Grain (`pip install -e '.[stream]'`, imported only here) maps positions to single
examples: decode with Pillow and augment with numpy (`data/augment.py`) in worker
processes (`PipelineOptions`), which stack them into pieces (`PIECE`) and hand these over
through rings in anonymous memory files (`data/piece_rings.py`); this process copies the pieces into
batch buffers reused from step to step (`HostBatches`), and at most
`PipelineOptions.examples_ahead` examples are decoded ahead of the consumer. A background
thread turns this process's part of every batch into the global array with the mesh's
batch sharding, a few batches ahead of the step (`DeviceBatches`).

Everything is index-based, so training batch `s` is a pure function of (seed, s):
- global position g = s * batch_size + k is example k of batch s; epoch g // N uses the
  permutation `default_rng([seed, 0, epoch])` of the N records, and the example's crop,
  flip and lighting come from `default_rng([seed, 1, g])`;
- process p of P reads positions [s * B + p * B/P, s * B + (p + 1) * B/P) of batch s:
  only its own share of each batch, and the global batch is the same for any P;
- so in each epoch process p reads only its share of the records (`epoch_share`): the
  shares of the P processes are disjoint and make up the set, drawn afresh each epoch. An
  unreadable image, when skipped, is replaced by the next one of the share.
The position to resume from is therefore the step the checkpoint already holds: a
resumed run gets exactly the batches it would have got, on any number of processes or
workers. Evaluation reads every record once, in order, the last batch padded and masked;
a set smaller than the eval batch is one batch of its own size (rounded up to the device
count). The eval pipeline of a training run is opened once: its workers (a small pool,
`dataset.eval_workers`) serve every evaluation, each one pass over the records. The
normalisation sample is decoded by threads of this process, without a pool.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.data import augment, input_workers, piece_rings, pool_limits
from resnet_jax.data.image_records import open_splits
from resnet_jax.data.sources import DataError
from resnet_jax.parallel import Parallel, eval_batch_size_for, gather_from_processes

# Training images whose center crops give the normalisation statistics: a seeded sample
# (ImageNet's mean is known to ~0.1% from 1000 images; the whole set would take an epoch).
NORMALIZATION_SAMPLE = 1000


def _grain():
    try:
        import grain  # only streamed datasets need it
    except ImportError as error:
        raise DataError(
            f"streamed datasets (image_folder, imagenet2012, imagenette) need grain ({error}): "
            "pip install -e '.[stream]'"
        ) from None
    return grain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normalization:
    """Mean and std in [0, 1] pixel units, on the devices: mean (H, W, 3) or (3,), std (3,)."""

    mean: jax.Array
    std: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StreamedBatch:
    """A train or eval step's input: the host pipeline's batch, on the devices ("image",
    "label", "lighting" for training; "views", "label", "mask" for evaluation), and the
    training images' normalisation, applied in the step."""

    batch: dict
    normalization: Normalization


def normalize(images: jnp.ndarray, norm: Normalization, offset: jnp.ndarray | float = 0.0) -> jnp.ndarray:
    """uint8 (..., H, W, 3) crops of the training size -> float32 with `offset` (lighting)
    added and the mean and std taken off."""
    # Adding the offset to every pixel is taking it off the mean: one normalisation for all data.
    return augment.normalize(images, norm.mean - offset, norm.std)


def train_images(inputs: StreamedBatch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The step's normalised images (each with its lighting offset) and labels (traceable)."""
    batch = inputs.batch
    offsets = batch["lighting"][:, None, None, :]
    return normalize(batch["image"], inputs.normalization, offsets), batch["label"]


def eval_views(inputs: StreamedBatch):
    """(views, labels, mask) of an evaluation batch, views normalised (traceable). Multi-
    scale views are a tuple of (canvases, valid sizes) per scale (`normalize_canvases`)."""
    batch, norm = inputs.batch, inputs.normalization
    if "valid" in batch:
        views = tuple((normalize_canvases(canvases, batch["valid"][:, i], norm), batch["valid"][:, i])
                      for i, canvases in enumerate(batch["views"]))
    else:
        views = normalize(batch["views"], norm)
    return views, batch["label"], batch["mask"]


def train_batch_like(image_size: int, batch_size: int, parallel: Parallel,
                     normalization: Normalization) -> StreamedBatch:
    """A training step's input as shapes and shardings (the global batch of `image_size`
    crops, as either loader gives it), to compile the step before any data is read."""
    def like(shape, dtype):
        return jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=parallel.batch)

    return StreamedBatch({"image": like((image_size, image_size, 3), np.uint8), "label": like((), np.int32),
                          "lighting": like((3,), np.float32)}, normalization)


def normalize_canvases(canvases: jnp.ndarray, valid: jnp.ndarray, norm: Normalization) -> jnp.ndarray:
    """uint8 (N, V, H, W, 3) canvases, each holding an image of size `valid[n]` in its
    top-left corner -> float32, normalised as that image alone would be, and 0 outside it
    (what the network's zero padding would see around the image alone). A per-pixel mean
    image is resized to each image's own size."""
    height, width = canvases.shape[-3:-1]
    mean = norm.mean
    if mean.ndim == 3:
        def resized_mean(size):  # jax.image.resize(mean, size) on the image's corner, traceable
            scale = size.astype(jnp.float32) / jnp.asarray(mean.shape[:2], jnp.float32)
            return jax.image.scale_and_translate(mean, (height, width, mean.shape[-1]), (0, 1), scale,
                                                 jnp.zeros(2, jnp.float32), "linear")
        mean = jax.vmap(resized_mean)(valid)[:, None]
    images = augment.normalize(canvases, mean, norm.std)
    return jnp.where(augment.inside(valid, height, width)[:, None, :, :, None], images, 0.0)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What the example transforms read of the config: plain values, cheap to pickle."""

    seed: int
    augment: str
    image_size: int
    scale_range: tuple[int, int]
    area_range: tuple[float, float]
    aspect_ratio_range: tuple[float, float]
    lighting_std: float
    eval_resize: int
    multi_scale_sizes: tuple[int, ...]
    skip_unreadable: bool

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> _Settings:
        d = config.dataset
        return cls(config.seed, d.augment, d.image_size, tuple(d.scale_range), tuple(d.area_range),
                   tuple(d.aspect_ratio_range), d.lighting_std, d.eval_resize, tuple(d.multi_scale_sizes),
                   d.skip_unreadable)


def _skipped(error: DataError, counts: collections.Counter) -> None:
    counts["skipped"] += 1
    print(f"warning: skipped unreadable image ({error}); {counts['skipped']} skipped so far "
          f"in process {os.getpid()}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class _Positions:
    """Which global positions process `process` of `count` reads: its share of each batch."""

    batch_size: int
    process: int
    count: int

    @property
    def share(self) -> int:
        return self.batch_size // self.count

    def global_position(self, local: int) -> int:
        return (local // self.share) * self.batch_size + self.process * self.share + local % self.share

    def reads(self, positions: np.ndarray) -> np.ndarray:
        """Which of the global `positions` this process reads (a mask)."""
        return positions % self.batch_size // self.share == self.process

    def locals_before(self, position: int) -> int:
        """How many of this process's positions lie below global position `position`."""
        batch, k = divmod(position, self.batch_size)
        return batch * self.share + min(max(k - self.process * self.share, 0), self.share)


def normalization_sample(seed: int, num_records: int) -> np.ndarray:
    """The training records whose center crops give the normalisation statistics, sorted."""
    return np.sort(np.random.default_rng([seed, 2]).choice(
        num_records, min(num_records, NORMALIZATION_SAMPLE), replace=False))


def multi_scale_order(record_buckets: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(records, buckets) by position of multi-scale evaluation, from each record's canvas
    bucket (-1: unreadable and skipped, left out): the records grouped by bucket, in order
    within each, each group padded with records of -1 to whole batches."""
    records, buckets = [], []
    for bucket in range(len(augment.MULTI_SCALE_BUCKETS)):
        members = np.flatnonzero(record_buckets == bucket)
        padding = -len(members) % batch_size
        records.append(np.concatenate([members, np.full(padding, -1)]))
        buckets.append(np.full(len(members) + padding, bucket))
    return np.concatenate(records), np.concatenate(buckets)


def epoch_order(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The order in which training epoch `epoch` reads the records: a permutation of them all."""
    return np.random.default_rng([seed, 0, epoch]).permutation(num_records)


def epoch_share(seed: int, num_records: int, epoch: int, positions: _Positions) -> np.ndarray:
    """The records process `positions.process` of `positions.count` reads in training epoch
    `epoch`, in the order it reads them: the epoch's order at the global positions it reads.
    The processes' shares of an epoch are disjoint and make up the whole set, so each host
    reads 1/P of the records per epoch; which ones changes with the epoch's permutation."""
    first = epoch * num_records
    mine = positions.reads(np.arange(first, first + num_records))
    return epoch_order(seed, epoch, num_records)[mine]


class TrainShareReader:
    """Local position -> (its global position, `read(record)` of the record it reads): the
    record at the position of this process's share of the position's epoch
    (`epoch_share`); an unreadable image (when skipping) is replaced by the next one of the
    share. What both loaders' training examples read (`_TrainExample`, `dali_feed.TrainFeed`)."""

    def __init__(self, read: Callable[[int], Any], num_records: int, settings: _Settings,
                 positions: _Positions):
        self.read, self.num_records, self.settings, self.positions = read, num_records, settings, positions
        self._epoch, self._share, self._first_local = -1, None, 0
        self._counts = collections.Counter()

    def _share_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # once per epoch per worker
            n = self.num_records
            self._share = epoch_share(self.settings.seed, n, epoch, self.positions)
            self._first_local = self.positions.locals_before(epoch * n)
            self._epoch = epoch
        return self._share

    def __call__(self, local: int) -> tuple[int, Any]:
        position = self.positions.global_position(local)
        share = self._share_of(position // self.num_records)
        k = local - self._first_local  # this position's place in the share
        for offset in range(len(share)):
            try:
                return position, self.read(int(share[(k + offset) % len(share)]))
            except DataError as error:
                if not self.settings.skip_unreadable:
                    raise
                _skipped(error, self._counts)
        raise DataError(f"no readable image in this process's share of the training split "
                        f"({len(share)} tried)")


class _TrainExample:
    """Local position -> {"image", "label", "lighting"}: a pure function of (seed, position),
    the image one of this process's share of the position's epoch (`epoch_share`)."""

    def __init__(self, source, settings: _Settings, positions: _Positions):
        self.settings = settings
        self._records = TrainShareReader(source.__getitem__, len(source), settings, positions)

    def __call__(self, local: int) -> dict:
        s = self.settings
        position, (image, label) = self._records(local)
        rng = np.random.default_rng([s.seed, 1, position])
        if s.augment == "scale_crop_flip":
            image = augment.scale_crop_flip(rng, image, s.scale_range, s.image_size)
        elif s.augment == "random_resized_crop":
            image = augment.random_resized_crop(rng, image, s.area_range, s.aspect_ratio_range, s.image_size)
        else:
            image = augment.center_crop(image, s.eval_resize, s.image_size)
        lighting = augment.lighting_offset(rng, s.lighting_std) if s.lighting_std else np.zeros(3, np.float32)
        return {"image": np.ascontiguousarray(image), "label": np.int32(label), "lighting": lighting}


class _EvalExample:
    """Local position -> {"views", "label", "mask"} of record `records[position]`; padding
    (positions past the end, records of -1) and skipped unreadable images have mask False.

    Multi-scale examples also hold "valid", each scale's resized image size on its canvas
    (`augment.multi_scale_views`); `buckets[position]` is the canvas bucket of the position,
    one per batch (`StreamedData.multi_scale_plan`), so that a padding example matches."""

    def __init__(self, source, records: np.ndarray, settings: _Settings, mode: str, positions: _Positions,
                 buckets: np.ndarray | None = None):
        self.source, self.records, self.settings, self.mode = source, records, settings, mode
        self.positions, self.buckets = positions, buckets
        self._counts = collections.Counter()

    def _views(self, image: np.ndarray) -> dict:
        s = self.settings
        if self.mode == "center":
            return {"views": np.ascontiguousarray(augment.center_crop(image, s.eval_resize, s.image_size))}
        if self.mode == "ten_crop":
            return {"views": np.ascontiguousarray(augment.ten_crops(image, s.eval_resize, s.image_size))}
        views, valid = augment.multi_scale_views(image, s.multi_scale_sizes)
        return {"views": tuple(np.ascontiguousarray(v) for v in views), "valid": valid}

    def blank(self, position: int) -> dict:
        """The views of a padding example at global `position` (the shape of a real one)."""
        s = self.settings
        if self.mode == "center":
            return {"views": np.zeros((s.image_size, s.image_size, 3), np.uint8)}
        if self.mode == "ten_crop":
            return {"views": np.zeros((10, s.image_size, s.image_size, 3), np.uint8)}
        bucket = int(self.buckets[position])
        canvases = [augment.multi_scale_canvas(bucket, side) for side in s.multi_scale_sizes]
        # A whole-canvas "image": padding scores finite numbers, then masked out.
        return {"views": tuple(np.zeros((2, *shape, 3), np.uint8) for shape in canvases),
                "valid": np.asarray(canvases, np.int32)}

    def __call__(self, local: int) -> dict:
        position = self.positions.global_position(local)
        if position < len(self.records) and self.records[position] >= 0:
            index = int(self.records[position])
            try:
                image, label = self.source[index]
                return {**self._views(image), "label": np.int32(label), "mask": np.bool_(True)}
            except DataError as error:
                if not self.settings.skip_unreadable:
                    raise
                _skipped(error, self._counts)
        return self.padding(position)

    def padding(self, position: int) -> dict:
        """The example of a padding position (masked out), as large as a real one."""
        return {**self.blank(position), "label": np.int32(0), "mask": np.bool_(False)}


class _RecordBucket:
    """Record index -> its multi-scale canvas bucket, from the image's size (-1: unreadable
    and skipped)."""

    def __init__(self, source, skip_unreadable: bool):
        self.source, self.skip_unreadable = source, skip_unreadable
        self._counts = collections.Counter()

    def __call__(self, index: int) -> np.int32:
        try:
            return np.int32(augment.multi_scale_bucket(*self.source.image_shape(index)))
        except DataError as error:
            if not self.skip_unreadable:
                raise
            _skipped(error, self._counts)
            return np.int32(-1)


# Launchers' count of the processes they started on this host (torchrun and friends, Open
# MPI, MPICH/Hydra, SLURM with --ntasks-per-node). Without one: one process per host, as
# `jax.distributed` on a TPU pod or one trainer driving all of a node's GPUs.
_LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                         "SLURM_NTASKS_PER_NODE")

# Grain unlinks the shared memory of a piece that crossed as blocks of its own (one larger
# than its ring's slots, or any without rings) on a background thread once the consumer is
# done with it, with up to this many unlinks pending (`SharedMemoryArray.enable_async_del`'s
# default): blocks already joined into a batch that may still occupy /dev/shm.
_PENDING_SHM_UNLINKS = 50
# A shared-memory block takes whole pages and a file: arrays smaller than a page (a
# piece's labels and lighting offsets) travel pickled instead (Grain's `min_shm_size`).
_PAGE = 4096
# Examples a worker stacks into one piece, the unit that crosses to the training process.
# Each crossing costs the training process a token's unpickling, a queue hand-over and the
# Python of joining, the same whatever the piece's size: over 32 examples it is a small
# part of the cost of copying their pixels, where over 8 it is about half as much again
# (benchmarks/RESULTS.md, the host-side ceiling, by piece size). Larger pieces gain little
# more and multiply the memory of each worker's ring (a 224x224 piece is 4.8 MB, a ring
# holds 2 x worker_buffer_size + 2). A piece is the
# largest divisor of the batch up to this, so that no piece straddles two batches (a multi-
# scale evaluation batch holds one canvas size, the next one may hold another).
PIECE = 32


def auto_workers() -> int:
    """`dataset.num_workers = -1`: the CPUs this process may use (its affinity, which
    taskset, cpusets and container CPU sets narrow; `os.cpu_count()` ignores them), divided
    among the training processes on this host, at least 1.

    The processes on this host are the launcher's local size (`_LOCAL_SIZE_VARIABLES`):
    processes started side by side see the same CPUs and would otherwise each start one
    worker per CPU. SLURM with --cpus-per-task gives each task its own CPUs, so its
    `SLURM_CPUS_PER_TASK` is this process's share as it stands. A CPU quota without a CPU
    set (docker --cpus) is not visible here: set the number of workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, min(cpus, int(os.environ["SLURM_CPUS_PER_TASK"])))
    local = next((int(os.environ[name]) for name in _LOCAL_SIZE_VARIABLES if os.environ.get(name)), 1)
    return max(1, cpus // local)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How one host decodes examples: in `workers` processes (0: in this one), each reading
    with `read_threads` threads and up to `read_buffer` pieces of `piece` examples
    submitted ahead, and passing finished pieces to this process through queues of
    `worker_buffer` pieces (Grain's `ReadOptions` and `MultiprocessingOptions`; the
    `dataset.` keys of the same names)."""

    workers: int
    read_threads: int
    read_buffer: int
    worker_buffer: int
    piece: int = PIECE

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> PipelineOptions:
        d = config.dataset
        workers = auto_workers() if d.num_workers == -1 else d.num_workers
        return cls(workers, d.read_threads, d.read_buffer_size, d.worker_buffer_size)

    @property
    def ring_slots(self) -> int:
        """Slots of each worker's ring (`piece_rings`): the pieces it may have handed over
        and this process not yet consumed, in its queue and this process's buffer for it
        and one on its way each side; a worker with a full ring waits."""
        return 2 * self.worker_buffer + 2

    def piece_of(self, batch_size: int) -> int:
        """Examples per piece for batches of `batch_size`: the largest divisor of it up to
        `piece`, so that each piece lies within one batch."""
        return max(d for d in range(1, min(self.piece, batch_size) + 1) if batch_size % d == 0)

    @property
    def pieces_in_shared_memory(self) -> int:
        """Most pieces in /dev/shm at once where they cross as blocks of their own (larger
        than their ring's slots, or without rings): per worker, one being queued,
        `worker_buffer` in its queue, `worker_buffer` in this process's buffer for it and
        one on its way there; and the consumed ones whose unlinking is pending. 0 without
        workers."""
        return self.workers * (2 * self.worker_buffer + 2) + _PENDING_SHM_UNLINKS if self.workers else 0

    def examples_ahead(self, batch_size: int) -> int:
        """Most examples decoded (or being decoded) that the consumer has not yet received
        in a batch, whenever it is not inside `next()`: pieces of `piece_of(batch_size)`,
        the read buffer of this process (0 workers) or each worker's read buffer plus what
        it has in flight towards this process (its ring's slots, `ring_slots`)."""
        if not self.workers:
            return self.read_buffer * self.piece_of(batch_size)
        pieces = self.workers * (self.read_buffer + self.ring_slots)
        return pieces * self.piece_of(batch_size)

    def host_bytes(self, example: Any, batch_size: int) -> int:
        """The bound on the host memory of the pipeline's examples like `example`, in bytes:
        the examples ahead (`examples_ahead`) and the `HostBatches.RING` batch buffers of
        this process. The pieces in flight are the workers' rings, whole (each worker's
        `piece_rings.ring_bytes`, shared by it and this process), or without rings the
        `pieces_in_shared_memory`' blocks (arrays below a page pickled). The workers' own
        footprint comes on top."""
        piece = self.piece_of(batch_size)
        example_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(example))
        read_ahead = self.read_buffer * piece * max(self.workers, 1)
        in_flight = 0
        if self.workers and piece_rings.AVAILABLE:
            in_flight = self.workers * piece_rings.ring_bytes(example, piece, self.ring_slots)
        elif self.workers:
            sizes = [piece * np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(example)]
            pickled = sum(size for size in sizes if size < _PAGE)
            in_flight = self.pieces_in_shared_memory * (shared_memory_bytes(example, piece) + pickled)
        return (read_ahead + HostBatches.RING * batch_size) * example_bytes + in_flight


def shared_memory_bytes(example: Any, piece: int = 1) -> int:
    """The /dev/shm a piece of `piece` examples like `example` takes between processes:
    each stacked numpy array of a page or more its own block of whole pages."""
    sizes = [piece * np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(example)]
    return sum(-(-size // _PAGE) * _PAGE for size in sizes if size >= _PAGE)


def _crosses_as_blocks(options: PipelineOptions, example: Any, batch_size: int, slot_example: Any) -> bool:
    """Whether pieces of examples like `example` (the largest the pipeline makes) cross as
    shared-memory blocks of their own: without rings, or larger than the slots of rings
    sized for `slot_example` (None: for `example` itself, as `HostBatches` sizes them for
    its `largest`, or for a first piece as large as any)."""
    if not options.workers or not piece_rings.AVAILABLE:
        return bool(options.workers)
    piece = options.piece_of(batch_size)
    slot = piece_rings.slot_bytes(example if slot_example is None else slot_example, piece)
    return piece_rings.slot_bytes(example, piece) > slot


def _pool_footprint(options: PipelineOptions, example: Any, batch_size: int,
                    slot_example: Any = None) -> tuple[int, int]:
    """(workers, most shared-memory blocks in flight) of a pool passing examples like
    `example` (the largest) in batches of `batch_size`, its rings' slots sized for
    `slot_example` (`_crosses_as_blocks`), for `pool_limits.check_file_descriptors`: each
    array of a page or more of a piece that crosses as blocks is a block of its own; a
    piece in a ring, none."""
    if not _crosses_as_blocks(options, example, batch_size, slot_example):
        return options.workers, 0
    piece = options.piece_of(batch_size)
    blocks = sum(piece * np.asarray(leaf).nbytes >= _PAGE for leaf in jax.tree_util.tree_leaves(example))
    return options.workers, options.pieces_in_shared_memory * blocks


def _free_shared_memory(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory filesystem workers pass examples through (None: no such
    folder, as on macOS, where Python's shared memory lives elsewhere)."""
    return shutil.disk_usage(path).free if os.path.isdir(path) else None


def check_shared_memory(options: PipelineOptions, example: Any, what: str, batch_size: int,
                        slot_example: Any = None) -> None:
    """Refuses, naming the sizes and the ways out, a pipeline whose pieces in flight
    between worker processes would not fit in the free /dev/shm: only pieces that cross as
    blocks of their own take it (`_crosses_as_blocks`; `example` is the largest the
    pipeline passes), none of those in the workers' rings."""
    if not _crosses_as_blocks(options, example, batch_size, slot_example):
        return
    piece = options.piece_of(batch_size)
    need = options.pieces_in_shared_memory * shared_memory_bytes(example, piece)
    free = _free_shared_memory()
    if free is None or need <= free:
        return
    mib = 2**20
    raise DataError(
        f"/dev/shm has {free / mib:.1f} MiB free, but the {what} pipeline needs up to {need / mib:.1f} MiB "
        f"there: {options.pieces_in_shared_memory} pieces of {piece} examples in flight between its "
        f"{options.workers} worker processes and this one (workers x (2 x dataset.worker_buffer_size + 2) + "
        f"{_PENDING_SHM_UNLINKS}) of {shared_memory_bytes(example, piece)} bytes, each in shared-memory "
        f"blocks of its own (too large for the workers' rings, or no rings on this system). Give the "
        f"container more shared memory (docker run --shm-size={-(-need // 2**30)}g, Kubernetes: an "
        f"emptyDir with medium Memory on /dev/shm), or lower dataset.num_workers or "
        f"dataset.worker_buffer_size."
    )


class HostBatches:
    """Batches of `batch_size` examples (the last one possibly smaller) of a Grain MapDataset
    of single examples, decoded as `options` says, as an iterator of numpy trees; `close()`
    stops the workers. The workers ignore SIGTERM and SIGINT, which reach every process of
    the group: this process decides what they mean (`input_workers`).

    Workers stack examples into pieces (`PipelineOptions.piece_of`), each crossing to this
    process in one hand-over, and this process only copies the pieces into batch buffers.
    With `reuse` the buffers are a ring of `RING`, allocated once: batch k is overwritten
    by batch k + RING, so its user must be done with it by then (`DeviceBatches`); without,
    each batch is fresh. The examples come in the dataset's order for any number of
    workers (Grain interleaves the workers' slices round-robin). The workers' rings hold
    pieces of `largest`, an example as large as any of `dataset`'s (None: each worker's
    first piece is as large as any it makes); `check_shared_memory` first, where workers
    pass examples of a new size."""

    # One buffer being filled while the previous batch's transfer to the devices completes.
    RING = 2

    def __init__(self, dataset, batch_size: int, options: PipelineOptions, reuse: bool = False,
                 largest: Any = None):
        grain = _grain()
        self.batch_size, self.reuse = batch_size, reuse
        piece = options.piece_of(batch_size)
        pieces = dataset.batch(piece)
        self._rings = None
        if options.workers and piece_rings.AVAILABLE:
            self._rings = piece_rings.RingReader(options.workers)
            slot = None if largest is None else piece_rings.slot_bytes(largest, piece)
            pieces = pieces.map_with_index(
                piece_rings.RingWriter(self._rings.control, options.workers, options.ring_slots, slot))
        iter_dataset = pieces.to_iter_dataset(grain.ReadOptions(
            num_threads=options.read_threads, prefetch_buffer_size=options.read_buffer))
        if options.workers:
            from absl import flags

            # Grain copies absl's flag values into its workers, and reading them needs them
            # parsed; train.py and evaluate.py parse their own flags with argparse.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iter_dataset = grain.experimental.WithOptionsIterDataset(
                iter_dataset, grain.experimental.DatasetOptions(min_shm_size=_PAGE))
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=options.workers, per_worker_buffer_size=options.worker_buffer),
                worker_init_fn=input_workers.init_input_worker)
        self._pieces = iter(iter_dataset)
        self._workers_started = not options.workers
        self._ring, self._turn = [], 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def _buffer(self, leaves) -> list[np.ndarray]:
        shapes = [(self.batch_size, *np.shape(leaf)[1:]) for leaf in leaves]
        if not self.reuse:
            return [np.empty(shape, leaf.dtype) for shape, leaf in zip(shapes, leaves, strict=True)]
        slot = self._turn % self.RING
        self._turn += 1
        if len(self._ring) <= slot or [b.shape for b in self._ring[slot]] != shapes:  # a new shape
            self._ring[slot:slot + 1] = [[np.empty(shape, leaf.dtype) for shape, leaf in
                                          zip(shapes, leaves, strict=True)]]
        return self._ring[slot]

    def __next__(self):
        batch, treedef, filled = None, None, 0
        while filled < self.batch_size:  # pieces divide the batch (the dataset's last may be short)
            try:
                piece = self._next_piece()
            except StopIteration:
                if batch is None:
                    raise
                return jax.tree_util.tree_unflatten(treedef, [leaf[:filled] for leaf in batch])
            if self._rings is None:
                (leaves, treedef), done = jax.tree_util.tree_flatten(piece), None
            else:
                leaves, treedef, done = self._rings.leaves(piece)
            if batch is None:
                batch = self._buffer(leaves)
            size = len(leaves[0])
            for column, leaf in zip(batch, leaves, strict=True):
                column[filled:filled + size] = leaf
            del leaves
            if done is not None:
                done()  # its slot may be written again
            filled += size
        return jax.tree_util.tree_unflatten(treedef, batch)

    def _next_piece(self):
        if self._workers_started:
            return next(self._pieces)
        # Grain starts the workers at the first request, from threads started by this one.
        with input_workers.stop_signals_held():
            self._workers_started = True
            return next(self._pieces)

    def close(self) -> None:
        if self._rings is not None:
            self._rings.stop()  # no worker waits for a slot while being stopped
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        if self._rings is not None:
            self._rings.close()


class DeviceBatches:
    """Each process's share of the batches of `host_batches` (a `HostBatches` with `reuse`)
    -> global arrays split over the `data` axis, transferred on a background thread up to
    `prefetch` batches ahead of the one being used (and one more in transfer), so the
    training thread only takes finished arrays. The thread waits for batch k's transfer
    before it fills batch k + RING's buffer, the same one. An error of the pipeline is
    raised here, at the batch it stopped; `close()` stops the thread (not the workers)."""

    _END = object()

    def __init__(self, host_batches, parallel: Parallel, prefetch: int):
        import queue
        import threading

        self._host, self._parallel = host_batches, parallel
        self._ready = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._transfer, name="host-to-device", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _transfer(self) -> None:
        # A CPU device may keep a numpy array's own memory as its buffer (no copy), so an
        # array made from a ring buffer would change when the ring comes round: there the
        # array gets a copy of its own. An accelerator's transfer copies, and is done
        # reading the buffer once the array is ready.
        aliases = any(device.platform == "cpu" for device in self._parallel.batch.device_set)
        own = np.copy if aliases else (lambda x: x)
        put = lambda x: jax.make_array_from_process_local_data(self._parallel.batch, own(x))  # noqa: E731
        previous = None
        try:
            for batch in self._host:  # fills the buffer batch k - RING was transferred from
                arrays = jax.tree_util.tree_map(put, batch)
                if previous is not None:
                    jax.block_until_ready(previous)
                    if not self._put(previous):
                        return
                previous = arrays
                if self._stop.is_set():
                    return
            if previous is not None:
                jax.block_until_ready(previous)
                if not self._put(previous):
                    return
            self._put(self._END)
        except BaseException as error:  # noqa: BLE001 - raised in the consumer's thread
            self._put(error)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self):
        item = self._ready.get()
        if item is self._END:
            self._ready.put(item)  # stays ended
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class StreamedData:
    """A streamed dataset's splits, opened and checked before anything is compiled, and the
    normalisation statistics of its training images."""

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel, roles: tuple[str, ...]):
        _grain()  # refuse early, with how to install it
        d = config.dataset
        self.config, self.parallel = config, parallel
        self.settings = _Settings.of(config)
        self.train, self.eval = open_splits(d, roles)
        self.num_classes = self.train.num_classes
        self.pipeline = PipelineOptions.of(config)
        # A training run's evaluation pool is small (`dataset.eval_workers`); evaluate.py's
        # is the only pool of its run.
        eval_workers = self.pipeline.workers if "train" not in roles else min(d.eval_workers,
                                                                               self.pipeline.workers)
        self.eval_pipeline = dataclasses.replace(self.pipeline, workers=eval_workers)
        # Training's workers pass training examples (the multi-scale plan's workers pass
        # smaller ones); evaluation checks its own views (`eval_passes`).
        self._train_pool = (0, 0)  # (workers, most shared-memory blocks in flight)
        if self.pipeline.workers and self.config.num_train_steps:  # decodes one example, here
            example = self.train_dataset(0)[0]
            share = self.config.batch_size // jax.process_count()
            check_shared_memory(self.pipeline, example, "training", share)
            if "train" in roles:
                self._train_pool = _pool_footprint(self.pipeline, example, share)
        eval_pool = (0, 0)
        if self.eval:  # a training run evaluates center crops (evaluate.py's other modes check again)
            center = _EvalExample(self.eval, np.zeros(0, np.int64), self.settings, "center",
                                  _Positions(1, 0, 1))
            eval_share = self.eval_batch_size // jax.process_count()
            eval_pool = _pool_footprint(self.eval_pipeline, center.padding(0), eval_share)
        pool_limits.check_file_descriptors(self._train_pool, eval_pool)
        self.normalization = self._normalization()

    def _normalization(self) -> Normalization:
        sample = normalization_sample(self.settings.seed, len(self.train))
        examples = _EvalExample(self.train, sample, self.settings, "center", _Positions(len(sample), 0, 1))
        # Decoded by threads of this process (Pillow releases the GIL while it decodes and
        # resizes): a worker pool's start would cost more than the sample's decoding.
        with concurrent.futures.ThreadPoolExecutor(max(self.pipeline.workers, self.pipeline.read_threads, 1),
                                                   thread_name_prefix="normalization-sample") as threads:
            views = [example["views"] for example in threads.map(examples, range(len(sample)))
                     if example["mask"]]
        if not views:
            raise DataError(f"no readable image among {len(sample)} sampled from the training split")
        mean, std = augment.normalization_stats(np.stack(views), self.config.dataset.normalization)
        put = lambda a: jax.make_array_from_process_local_data(self.parallel.replicated, a)  # noqa: E731
        return Normalization(put(mean), put(std))

    @property
    def eval_batch_size(self) -> int:
        """The global eval batch: the config's, or the size of a smaller evaluation set
        rounded up to the device count."""
        return eval_batch_size_for(self.config.eval_batch_size, len(self.eval), self.parallel.num_devices)

    def _positions(self, batch_size: int) -> _Positions:
        return _Positions(batch_size, jax.process_index(), jax.process_count())

    @contextlib.contextmanager
    def _batches(self, dataset, batch_size: int) -> Iterator[Iterator[StreamedBatch]]:
        """`dataset`'s examples in batches of this process's share of `batch_size`, on the devices."""
        host = HostBatches(dataset, batch_size // jax.process_count(), self.pipeline, reuse=True)
        batches = DeviceBatches(host, self.parallel, self.config.dataset.prefetch_batches)
        try:
            yield (StreamedBatch(batch, self.normalization) for batch in batches)
        finally:
            batches.close()
            host.close()

    def train_dataset(self, start_step: int):
        """The Grain MapDataset of this process's examples of the training batches from
        `start_step` on, one numpy tree each, in order: its share of each batch in turn
        (what `train_batches` batches and transfers)."""
        grain, c = _grain(), self.config
        share = c.batch_size // jax.process_count()
        return grain.MapDataset.range(start_step * share, c.num_train_steps * share).map(
            _TrainExample(self.train, self.settings, self._positions(c.batch_size)))

    def train_batches(self, start_step: int) -> contextlib.AbstractContextManager[Iterator[StreamedBatch]]:
        """The inputs of the training steps from `start_step` on."""
        return self._batches(self.train_dataset(start_step), self.config.batch_size)

    def multi_scale_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(records, buckets) by position of multi-scale evaluation: the records grouped by
        canvas bucket (in order within each), each group padded with records of -1 to whole
        batches, so that a batch holds one canvas shape per scale and at most
        len(MULTI_SCALE_BUCKETS) shapes are compiled. Reads every image's size first (an
        image folder's file headers; a TFDS record is decoded): each of the P processes
        those of its block of 1/P of the records, and they exchange what they found."""
        grain, batch, n = _grain(), self.eval_batch_size, len(self.eval)
        block = -(-n // jax.process_count())
        first = min(jax.process_index() * block, n)
        sizes = grain.MapDataset.range(first, min(first + block, n)).map(
            _RecordBucket(self.eval, self.settings.skip_unreadable))
        found = np.full(block, -1, np.int32)  # past the end: cut off below
        host = HostBatches(sizes, 256, self.eval_pipeline)
        try:
            for k, part in enumerate(host):
                found[k * 256:k * 256 + len(part)] = part
        finally:
            host.close()
        return multi_scale_order(gather_from_processes(found)[:n], batch)

    def eval_batch_like(self, mode: str) -> StreamedBatch | None:
        """An eval step's input in `mode` as shapes and shardings, to compile the step
        before any data is read; None for multi-scale, whose canvases vary by batch."""
        if mode == "multi_scale":
            return None
        blank = _EvalExample(self.eval, np.zeros(0, np.int64), self.settings, mode, _Positions(1, 0, 1))(0)
        batch = {key: jax.ShapeDtypeStruct((self.eval_batch_size, *np.shape(value)), np.asarray(value).dtype,
                                           sharding=self.parallel.batch)
                 for key, value in blank.items()}
        return StreamedBatch(batch, self.normalization)

    @contextlib.contextmanager
    def eval_passes(self, mode: str) -> Iterator[Callable[[], Iterator[StreamedBatch]]]:
        """`one_pass()` -> the inputs of one evaluation: every evaluation record once, as
        `mode` views (`scoring.MODES`), in order (multi-scale: in order within each canvas
        bucket, `multi_scale_plan`); padding masked. Each pass must be used up before the
        next. The worker processes start at the first pass and serve every later one (the
        batches repeat, each pass takes exactly its own) until the context closes."""
        grain, batch_size = _grain(), self.eval_batch_size
        share = batch_size // jax.process_count()
        if mode == "multi_scale":
            records, buckets = self.multi_scale_plan()
        else:
            records, buckets = np.arange(len(self.eval)), None
        num_batches = -(-len(records) // batch_size)
        examples = _EvalExample(self.eval, records, self.settings, mode, self._positions(batch_size), buckets)
        dataset = grain.MapDataset.range(num_batches * share).map(examples)
        if self.eval_pipeline.workers:
            # A padding example has the shape of a real one, without reading an image: the
            # largest is that of the widest canvas bucket (multi-scale), or any. The rings'
            # slots hold it (the first piece of a multi-scale pass is of the squarest
            # bucket present, its smallest canvases), so no piece crosses through /dev/shm.
            firsts = [0] if buckets is None else np.unique(buckets, return_index=True)[1]
            largest = max((examples.padding(int(position)) for position in firsts),
                          key=lambda example: piece_rings.slot_bytes(example, 1), default={})
            check_shared_memory(self.eval_pipeline, largest, f"{mode} evaluation", share)
            pool_limits.check_file_descriptors(self._train_pool,
                                               _pool_footprint(self.eval_pipeline, largest, share))
        else:
            largest = None
        host, batches = None, None

        def one_pass() -> Iterator[StreamedBatch]:
            nonlocal host, batches
            if host is None:  # the examples repeat: a pass is the next num_batches batches
                host = HostBatches(dataset.repeat(), share, self.eval_pipeline, reuse=True, largest=largest)
            if batches is not None:
                batches.close()
            batches = DeviceBatches(itertools.islice(host, num_batches), self.parallel,
                                    self.config.dataset.prefetch_batches)
            return (StreamedBatch(batch, self.normalization) for batch in batches)

        try:
            yield one_pass
        finally:
            if batches is not None:
                batches.close()
            if host is not None:
                host.close()
