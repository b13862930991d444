"""What the DALI loader feeds its pipelines: each sample's encoded image and the geometry
of its views, worked out on the host (numpy only; DALI itself is imported by `data/dali.py`).

DALI decodes and resamples; everything else is decided here, as the Grain path decides
it (`data/stream.py`): which record sits at a global position (the epoch's permutation,
the process's and device's share of each batch, an unreadable image replaced by the next
of the share) and every random choice about it (shorter side, crop position, random-
resized-crop box, flip, lighting), drawn with the same functions of `data/augment.py`
from the same generator `default_rng([seed, 1, position])`. So a training batch is a pure
function of (seed, step) here too: a resumed run gets exactly the batches it would have
got. And the two loaders draw the same views of the same images, which differ only by
the resampling filter's rounding (`tests/test_dali.py`).

A view is a `Window`: the region of the encoded image to decode (`fn.decoders.image_slice`,
which decodes only that region: the whole image costs more to decode than a crop of it),
and the box of that region resized to the view (`fn.resize`'s region of interest, whose
start and end swapped along x flip it). The region reaches a few pixels past the box, so
the resampling filter sees what it would see in the whole image.

A feed is the pipeline's `fn.external_source`: called with DALI's batch info, it returns
one list per output (`OUTPUTS`) of the samples of its device's share of the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import struct

import numpy as np

from resnet_jax.data import augment
from resnet_jax.data.image_records import header_image_shape
from resnet_jax.data.sources import DataError
from resnet_jax.data.stream import TrainShareReader, _Positions, _Settings, _skipped


@dataclasses.dataclass(frozen=True)
class Window:
    """A view of an image: decode the region at `anchor` (top, left) of `shape` (height,
    width), then resize its box from `roi_start` to `roi_end` ((y, x) in the region's
    pixels; x reversed: flipped) to the view's size."""

    anchor: np.ndarray
    shape: np.ndarray
    roi_start: np.ndarray
    roi_end: np.ndarray


def window(height: int, width: int, box: tuple[float, float, float, float], out_size: tuple[int, int],
           flip: bool = False) -> Window:
    """The `Window` that resizes `box` (top, left, height, width, in pixels of a height x
    width image, fractional where it is a crop of a resized image) to `out_size`."""
    top, left, box_height, box_width = box
    # A downscaling filter reaches about one scale factor of input pixels past an output
    # pixel's centre, an upscaling one a pixel: the region holds that much beyond the box.
    margin = math.ceil(max(box_height / out_size[0], box_width / out_size[1], 1.0)) + 1
    y0, x0 = max(math.floor(top) - margin, 0), max(math.floor(left) - margin, 0)
    y1 = min(math.ceil(top + box_height) + margin, height)
    x1 = min(math.ceil(left + box_width) + margin, width)
    start = [top - y0, left - x0]
    end = [start[0] + box_height, start[1] + box_width]
    if flip:
        start[1], end[1] = end[1], start[1]
    return Window(np.array([y0, x0], np.int32), np.array([y1 - y0, x1 - x0], np.int32),
                  np.array(start, np.float32), np.array(end, np.float32))


def crop_of_resized(height: int, width: int, side: int, top: int, left: int, size: int) -> tuple:
    """The box, in the image's own pixels, of the `size` crop at (top, left) of the image
    resized to shorter side `side` (`augment.resize_shorter`)."""
    new_height, new_width = augment.shorter_side_shape(height, width, side)
    scale_y, scale_x = height / new_height, width / new_width
    return top * scale_y, left * scale_x, size * scale_y, size * scale_x


def train_window(rng: np.random.Generator, height: int, width: int, s: _Settings) -> Window:
    """The training view of a height x width image, drawn from `rng` as `stream` draws it."""
    size = s.image_size
    if s.augment == "scale_crop_flip":
        side, top, left, flip = augment.scale_crop_params(rng, height, width, s.scale_range, size)
        box = crop_of_resized(height, width, side, top, left, size)
        return window(height, width, box, (size, size), flip)
    if s.augment == "random_resized_crop":
        top, left, box_height, box_width, flip = augment.random_resized_crop_params(
            rng, height, width, s.area_range, s.aspect_ratio_range)
        return window(height, width, (top, left, box_height, box_width), (size, size), flip)
    return center_window(height, width, s)


def center_window(height: int, width: int, s: _Settings) -> Window:
    """The center `image_size` crop of the image resized to shorter side `eval_resize`."""
    new_height, new_width = augment.shorter_side_shape(height, width, s.eval_resize)
    top, left = augment.five_crop_corners(new_height, new_width, s.image_size)[-1]
    box = crop_of_resized(height, width, s.eval_resize, top, left, s.image_size)
    return window(height, width, box, (s.image_size, s.image_size))


# JPEG's start-of-frame markers (every one from 0xC0 to 0xCF but DHT, JPG and DAC), which
# hold the image's height and width, and the markers that stand alone, without a length.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encoded_image_shape(data: bytes, what: str) -> tuple[int, int]:
    """(height, width) of a complete JPEG or PNG, from its header's bytes; a DataError naming
    `what` for anything else: another format, a header without a size, or a file cut short
    (a JPEG without its end-of-image marker after the frame header, a PNG without its IEND
    chunk). DALI must not be handed those: its CPU decoders (2.4) crash the process on one
    in a batch of more than 32."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        if data.rfind(b"IEND") < 0:
            raise DataError(f"{what}: unreadable image (a PNG without its IEND chunk: cut short)")
        width, height = struct.unpack_from(">II", data, 16)
        return height, width
    if data[:2] != b"\xff\xd8":
        raise DataError(f"{what}: unreadable image (neither JPEG nor PNG: it begins {data[:8]!r})")
    frame = _jpeg_frame(data)
    # Pillow reads headers the walk does not (bytes between segments), or names what is wrong.
    at, (height, width) = frame if frame else (2, header_image_shape(io.BytesIO(data), what))
    if data.rfind(b"\xff\xd9") < at:  # entropy-coded data holds no FF D9: only the end does
        raise DataError(f"{what}: unreadable image (a JPEG without its end-of-image marker: cut short)")
    return height, width


def _jpeg_frame(data: bytes) -> tuple[int, tuple[int, int]] | None:
    """(where, (height, width)) of a JPEG's frame header, found by walking its segments (a
    microsecond; Pillow's parser, tables and all, takes about 60), or None."""
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return (at, (height, width)) if height and width else None
        # A fill byte, a marker without a length, or a segment with one.
        at += 1 if marker == 0xFF else 2 if marker in _JPEG_STANDALONE else 2 + int.from_bytes(
            data[at + 2:at + 4], "big")
    return None


class _Records:
    """Record index -> (encoded bytes, label, height, width), the size read from the header."""

    def __init__(self, source):
        self.source = source

    def __call__(self, index: int) -> tuple[np.ndarray, int, int, int]:
        data, label = self.source.encoded(index)
        height, width = encoded_image_shape(data, self.source.describe(index))
        return np.frombuffer(data, np.uint8), label, height, width


class TrainFeed:
    """Batch i -> the samples of one device's share of training step `start_step` + i:
    `OUTPUTS`, the training view's `Window`, the label and the lighting offset."""

    OUTPUTS = ("encoded", "anchor", "shape", "roi_start", "roi_end", "label", "lighting")

    def __init__(self, source, settings: _Settings, positions: _Positions, start_step: int):
        self.settings, self.positions, self.start_step = settings, positions, start_step
        self._records = TrainShareReader(_Records(source), len(source), settings, positions)

    def sample(self, local: int) -> tuple:
        s = self.settings
        position, (data, label, height, width) = self._records(local)
        rng = np.random.default_rng([s.seed, 1, position])
        view = train_window(rng, height, width, s)
        lighting = augment.lighting_offset(rng, s.lighting_std) if s.lighting_std else np.zeros(3, np.float32)
        return (data, view.anchor, view.shape, view.roi_start, view.roi_end, np.int32(label),
                np.asarray(lighting, np.float32))

    def __call__(self, info) -> tuple[list, ...]:
        share = self.positions.share
        first = (self.start_step + info.iteration) * share
        return _columns([self.sample(local) for local in range(first, first + share)])


def _columns(samples: list[tuple]) -> tuple[list, ...]:
    return tuple(list(column) for column in zip(*samples, strict=True))


class EvalFeed:
    """Batch i -> the samples of one device's share of evaluation batch i mod `num_batches`
    (passes repeat): the record at each position (`records`, -1: padding) as `mode` views
    (`OUTPUTS[mode]`), its label, and whether it counts (`mask`). Padding and skipped
    unreadable images are views of a stand-in image, the split's first readable one,
    masked out; for multi-scale, on their batch's canvases (`buckets`, one per batch)."""

    OUTPUTS = {
        "center": ("encoded", "anchor", "shape", "roi_start", "roi_end", "label", "mask"),
        "ten_crop": ("encoded", "size", "corners", "label", "mask"),
        "multi_scale": ("encoded", "anchor", "shape", "sizes", "canvases", "valid", "label", "mask"),
    }

    def __init__(self, source, records: np.ndarray, settings: _Settings, mode: str, positions: _Positions,
                 buckets: np.ndarray | None = None):
        self.read, self.records, self.settings, self.mode = _Records(source), records, settings, mode
        self.positions, self.buckets = positions, buckets
        self.num_batches = max(-(-len(records) // positions.batch_size), 1)
        self._stand_in = None
        self._counts = collections.Counter()

    def stand_in(self) -> tuple:
        """The first readable record of the split: what padding positions show."""
        if self._stand_in is None:
            for index in range(len(self.read.source)):
                try:
                    self._stand_in = self.read(index)
                    break
                except DataError as error:
                    if not self.settings.skip_unreadable:
                        raise
                    _skipped(error, self._counts)
            else:
                raise DataError("no readable image in the evaluation split")
        return self._stand_in

    def views(self, data: np.ndarray, height: int, width: int, bucket: int | None = None) -> tuple:
        """The mode's view arguments of an image (a padding example's: with `bucket`)."""
        s = self.settings
        if self.mode == "center":
            view = center_window(height, width, s)
            return data, view.anchor, view.shape, view.roi_start, view.roi_end
        if self.mode == "ten_crop":
            size = augment.shorter_side_shape(height, width, s.eval_resize)
            corners = augment.five_crop_corners(*size, s.image_size)
            return data, np.array(size, np.float32), np.array(corners, np.int32)
        top, left, box_height, box_width = augment.widest_bucket_box(height, width)
        own_bucket = augment.multi_scale_bucket(box_height, box_width)
        canvases = np.array([augment.multi_scale_canvas(own_bucket if bucket is None else bucket, side)
                             for side in s.multi_scale_sizes], np.int32)
        if bucket is None:
            sizes = np.array([augment.shorter_side_shape(box_height, box_width, side)
                              for side in s.multi_scale_sizes], np.int32)
        else:  # the stand-in stretched over the whole canvas: finite scores, then masked out
            sizes = canvases
        return (data, np.array([top, left], np.int32), np.array([box_height, box_width], np.int32),
                sizes.astype(np.float32), canvases, sizes)

    def sample(self, position: int) -> tuple:
        if position < len(self.records) and self.records[position] >= 0:
            index = int(self.records[position])
            try:
                data, label, height, width = self.read(index)
                return (*self.views(data, height, width), np.int32(label), np.bool_(True))
            except DataError as error:
                if not self.settings.skip_unreadable:
                    raise
                _skipped(error, self._counts)
        data, _, height, width = self.stand_in()
        bucket = None if self.buckets is None else int(self.buckets[position])
        return (*self.views(data, height, width, bucket), np.int32(0), np.bool_(False))

    def __call__(self, info) -> tuple[list, ...]:
        share = self.positions.share
        first = info.iteration % self.num_batches * share
        return _columns([self.sample(self.positions.global_position(local))
                         for local in range(first, first + share)])
