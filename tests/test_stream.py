"""The streamed input pipeline on a tiny generated image folder: what it reads, which
batches it gives (deterministic, resumable, split between processes), bad data, and how
far decoding runs ahead of the consumer."""

import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.config import imagenet_recipe
from resnet_jax.data import augment, image_records, piece_rings, stream
from resnet_jax.data.sources import DataError
from resnet_jax.data.stream import HostBatches
from resnet_jax.parallel import data_parallel
from tests.fake_data import write_image_folder

pytestmark = pytest.mark.grain


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), seed=0)  # 3 classes x (6 train, 3 val)


def small_config(data_dir, **dataset):
    config = imagenet_recipe("resnet8", "image_folder")
    config.dataset.data_dir = str(data_dir)
    config.dataset.update(dict(image_size=16, scale_range=(20, 24), eval_resize=20,
                               multi_scale_sizes=(16, 24), num_workers=0, prefetch_batches=1))
    config.dataset.update(dataset)
    config.batch_size, config.eval_batch_size, config.num_train_steps = 4, 4, 12
    return config


def host_batches(data, start, count):
    with data.train_batches(start) as batches:
        return [np.asarray(next(batches).batch["image"]) for _ in range(count)]


def test_image_folder_reads_classes_in_sorted_order_from_jpeg_and_png(folder):
    train = image_records.ImageFolder(folder, "train")
    assert train.classes == ("class_0", "class_1", "class_2") and len(train) == 18
    assert {train.describe(i).rsplit(".", 1)[1] for i in range(len(train))} == {"jpg", "png"}
    np.testing.assert_array_equal(train.labels, np.repeat([0, 1, 2], 6))
    image, label = train[17]
    assert image.dtype == np.uint8 and image.shape in ((40, 52, 3), (52, 40, 3)) and label == 2
    assert image.mean() > train[0][0].mean() + 100  # graded by class, as written
    assert len(image_records.ImageFolder(folder, "validation", train.classes)) == 9


def generated_folder(files: int, classes: int = 4) -> image_records.ImageFolder:
    names = [[f"n{c:08d}_{k}.JPEG" for k in range(c, files, classes)] for c in range(classes)]
    return image_records.ImageFolder.from_names("/data/train", [f"n{c:08d}" for c in range(classes)], names)


def test_an_image_folder_pickles_to_the_same_size_whatever_its_number_of_files():
    small, large = generated_folder(100), generated_folder(10_000)
    assert (len(small), len(large)) == (100, 10_000)
    assert large.describe(9_999) == "/data/train/n00000003/n00000003_9999.JPEG"
    # A copy of the names would add 9,900 x 20 bytes; the classes are the same.
    assert abs(len(pickle.dumps(large)) - len(pickle.dumps(small))) < 64


def test_an_image_folder_from_its_names_is_the_listed_one_and_keeps_any_file_name(folder, tmp_path):
    train = image_records.ImageFolder(folder, "train")
    names = [sorted(p.name for p in (folder / "train" / c).iterdir()) for c in train.classes]
    given = image_records.ImageFolder.from_names(folder / "train", train.classes, names)
    assert [given.describe(i) for i in range(len(given))] == [train.describe(i) for i in range(len(train))]
    np.testing.assert_array_equal(given.labels, train.labels)
    undecodable = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes in a UTF-8 file system
    odd = image_records.ImageFolder.from_names(tmp_path, ("a", "b"),
                                               [["x.jpg"], [undecodable, "\u00e9t\u00e9.png"]])
    assert [odd.describe(i) for i in (0, 1, 2, -1)] == [
        f"{tmp_path}/a/x.jpg", f"{tmp_path}/b/{undecodable}", f"{tmp_path}/b/\u00e9t\u00e9.png",
        f"{tmp_path}/b/\u00e9t\u00e9.png"]
    with pytest.raises(IndexError):
        odd.describe(3)


def paths_labels_and_bytes(split: image_records.ImageFolder) -> tuple[list, list, list]:
    """What a worker process reads of `split`: every path, label and file."""
    files = [split.encoded(i) for i in range(len(split))]
    return ([split.describe(i) for i in range(len(split))], [label for _, label in files],
            [data for data, _ in files])


def test_a_spawned_worker_maps_the_folders_file_list_and_reads_the_same_paths_labels_and_files(folder):
    train = image_records.ImageFolder(folder, "train")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as worker:
        assert worker.submit(paths_labels_and_bytes, train).result() == paths_labels_and_bytes(train)


def test_a_pickled_folder_whose_process_closed_its_file_list_is_refused(folder):
    pickled = pickle.dumps(image_records.ImageFolder(folder, "train"))
    gc.collect()  # the folder is gone, and with it its file list's descriptor
    image_records.ImageFolder(folder, "train")  # which a new list may take again
    with pytest.raises(DataError, match=r"/proc/\d+/fd/\d+: (cannot open|no longer) the arrays process"):
        pickle.loads(pickled)


def test_image_folder_layout_errors_name_the_folder_and_the_layout(folder, tmp_path):
    with pytest.raises(DataError, match=r"no such directory.*train/<class>"):
        image_records.ImageFolder(tmp_path / "nowhere", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"train: no class folders"):
        image_records.ImageFolder(tmp_path, "train")
    with pytest.raises(DataError, match=r"val: no such directory \(the validation split\)"):
        image_records.ImageFolder(tmp_path, "validation")
    with pytest.raises(DataError, match=r"split's \(only here: none; missing here: \['x'\]"):
        image_records.ImageFolder(folder, "validation", ("class_0", "class_1", "class_2", "x"))


def test_an_unreadable_image_is_an_error_naming_it_or_skipped_and_counted(folder, tmp_path, capsys):
    import shutil

    root = shutil.copytree(folder, tmp_path / "copy")
    broken = root / "train" / "class_1" / "002.jpg"
    broken.write_bytes(b"not a jpeg")
    parallel = data_parallel()
    with pytest.raises(DataError, match=rf"{broken}: unreadable image"):
        stream.StreamedData(small_config(root), parallel, ("train", "eval"))
    data = stream.StreamedData(small_config(root, skip_unreadable=True), parallel, ("train", "eval"))
    batches = host_batches(data, 0, 5)  # 20 examples: every one of the 18 files at least once
    assert all(b.shape == (4, 16, 16, 3) for b in batches)
    err = capsys.readouterr().err
    assert f"skipped unreadable image ({broken}: unreadable image" in err and "skipped so far" in err


def test_training_batches_are_a_function_of_seed_and_step_so_resuming_gets_the_next_ones(folder):
    data = stream.StreamedData(small_config(folder), data_parallel(), ("train",))
    uninterrupted = host_batches(data, 0, 7)  # 28 examples: across the epoch boundary (18)
    resumed = host_batches(data, 3, 4)  # a new pipeline, started mid-epoch at step 3
    for a, b in zip(uninterrupted[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = stream.StreamedData(small_config(folder), data_parallel(), ("train",))
    other_seed.settings = stream._Settings(**{**vars(data.settings), "seed": 1})
    assert not np.array_equal(host_batches(other_seed, 0, 1)[0], uninterrupted[0])


def test_each_epoch_sees_every_image_once(folder):
    config = small_config(folder, augment="none")
    data = stream.StreamedData(config, data_parallel(), ("train",))
    with data.train_batches(0) as batches:
        labels = np.concatenate([np.asarray(next(batches).batch["label"]) for _ in range(9)])
    for epoch in (labels[:18], labels[18:36]):
        assert sorted(epoch) == sorted(np.repeat([0, 1, 2], 6))
    assert not np.array_equal(labels[:18], labels[18:36])  # reshuffled


def test_processes_read_disjoint_shares_that_make_up_the_global_batch(folder):
    data = stream.StreamedData(small_config(folder), data_parallel(), ("train",))
    whole = stream._TrainExample(data.train, data.settings, stream._Positions(4, 0, 1))
    shares = [stream._TrainExample(data.train, data.settings, stream._Positions(4, p, 2)) for p in (0, 1)]
    for step in (0, 5):
        expected = [whole(step * 4 + k)["image"] for k in range(4)]
        got = [shares[p](step * 2 + k)["image"] for p in (0, 1) for k in range(2)]
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_array_equal(a, b)


class RecordingSource:
    """A split that notes which records are read."""

    def __init__(self, split):
        self.split, self.read = split, []

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        self.read.append(index)
        return self.split[index]


def test_in_each_epoch_processes_read_disjoint_shares_of_the_records_that_make_up_the_set(folder):
    settings = stream._Settings.of(small_config(folder))
    train = image_records.ImageFolder(folder, "train")
    n = len(train)  # 18, in batches of 4: epochs end inside batches
    for epoch in (0, 1, 2):
        positions = [stream._Positions(4, p, 2) for p in (0, 1)]
        shares = [stream.epoch_share(settings.seed, n, epoch, at) for at in positions]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(np.concatenate(shares).tolist()) == list(range(n))
        for share, at in zip(shares, positions, strict=True):  # what the pipeline reads is the share
            source = RecordingSource(train)
            example = stream._TrainExample(source, settings, at)
            for local in range(at.locals_before(epoch * n), at.locals_before((epoch + 1) * n)):
                example(local)
            assert source.read == share.tolist()
    assert not np.array_equal(stream.epoch_share(settings.seed, n, 0, positions[0]), shares[0])


def test_worker_processes_give_the_same_batches_as_the_main_process(folder):
    in_process = stream.StreamedData(small_config(folder), data_parallel(), ("train",))
    workers = stream.StreamedData(small_config(folder, num_workers=2), data_parallel(), ("train",))
    for a, b in zip(host_batches(in_process, 2, 3), host_batches(workers, 2, 3), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_held_on_the_devices_stay_intact_while_the_host_buffers_are_reused(folder, workers):
    data = stream.StreamedData(small_config(folder, num_workers=workers), data_parallel(), ("train",))
    examples = data.train_dataset(0)
    with data.train_batches(0) as batches:
        held = [next(batches).batch for _ in range(12)]  # the ring of 2 buffers comes round 6 times
    for step, batch in enumerate(held):
        expected = [examples[step * 4 + k] for k in range(4)]
        for key in ("image", "label", "lighting"):
            np.testing.assert_array_equal(np.asarray(batch[key]), np.stack([e[key] for e in expected]))


class CountingSource:
    """An image source that appends a byte to the file `log` for each image it decodes, in
    whichever process decodes it."""

    def __init__(self, source, log):
        self.source, self.log = source, str(log)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        with open(self.log, "ab") as log:
            log.write(b".")
        return self.source[index]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_slow_consumer_holds_decoding_within_the_stated_bound_of_examples_ahead(folder, tmp_path, workers):
    config = small_config(folder)
    config.num_train_steps = 40
    data = stream.StreamedData(config, data_parallel(), ("train",))
    example = data.train_dataset(0)[0]
    log = tmp_path / "decoded"
    log.touch()
    data.train = CountingSource(data.train, log)
    options = stream.PipelineOptions(workers=workers, read_threads=2, read_buffer=3, worker_buffer=2)
    # Batches of 4 travel as pieces of 4 (the largest divisor up to stream.PIECE).
    assert options.examples_ahead(4) == 4 * (3 if workers == 0 else 2 * (3 + 2 * 2 + 2))
    example_bytes = 16 * 16 * 3 + 4 + 3 * 4
    # Read ahead (3 pieces per process) and the two batch buffers, plus the pieces in
    # flight: each worker's ring of 2 x 2 + 2 slots of a piece of 4 (the crops' 3,072 bytes,
    # the labels' 16 and the lighting's 48 each on 64-byte lines: 3,200), in whole pages.
    rings = 2 * 5 * 4096 if workers else 0
    assert options.host_bytes(example, 4) == ((3 * 4 * max(workers, 1) + 2 * 4) * example_bytes + rings)
    host = stream.HostBatches(data.train_dataset(0), 4, options, reuse=True)
    ahead = []
    try:
        for received in range(1, 9):
            assert next(host)["image"].shape == (4, 16, 16, 3)
            time.sleep(0.5)  # a slow training step: meanwhile the pipeline fills every buffer
            ahead.append(log.stat().st_size - 4 * received)
        assert sum(ring_mappings().values()) == rings  # both rings mapped here, as large as stated
    finally:
        host.close()
    assert 0 < max(ahead) <= options.examples_ahead(4), ahead
    assert not ring_mappings()


def ring_mappings(pid: int | str = "self") -> dict[str, int]:
    """The workers' rings (`data/piece_rings.py`) that process `pid` maps: bytes by inode."""
    found = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].startswith("/memfd:resnet_jax-piece-ring"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            found[fields[4]] = found.get(fields[4], 0) + end - start
    return found


def test_hosts_batches_end_with_a_short_batch_and_keep_the_examples_order():
    import grain

    examples = grain.MapDataset.range(10).map(lambda i: {"x": np.full(2, i, np.int32), "i": np.int32(i)})
    host = stream.HostBatches(examples, 4, stream.PipelineOptions(0, 1, 1, 1))
    batches = list(host)
    assert [b["i"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[2]["x"].tolist() == [[8, 8], [9, 9]]


def test_the_default_pipeline_at_224_needs_no_shared_memory_and_blocks_that_would_not_fit_are_refused(
        folder, monkeypatch):
    """Pieces in the workers' rings take no /dev/shm: the default training pipeline at
    224x224 passes a container's default 64 MiB with the default workers or a pod's
    pool. Pieces that cross as blocks of their own (no rings on the system, or larger than
    the rings' slots) are still counted and refused where they would not fit."""
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: 64 * 2**20)
    for workers in (-1, 112):
        config = small_config(folder, num_workers=workers, image_size=224, scale_range=(256, 480),
                              eval_resize=256)
        config.batch_size = 1024  # pieces of 32, as ImageNet's
        stream.StreamedData(config, data_parallel(), ("train",))
    sizes = dict(num_workers=2, image_size=38, scale_range=(40, 44), eval_resize=40)
    options = stream.PipelineOptions.of(small_config(folder, **sizes))
    assert options.pieces_in_shared_memory == 2 * (2 * 4 + 2) + 50  # the defaults' worker buffers of 4
    # small_config's batch of 4 travels in pieces of 4: 4 38x38 crops (17,328 bytes) take
    # five pages as a block; the lighting offsets (48 bytes) travel pickled.
    assert options.piece_of(4) == 4
    need = options.pieces_in_shared_memory * 5 * 4096
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: need // 2)
    stream.StreamedData(small_config(folder, **sizes), data_parallel(), ("train",))  # in the rings
    refused = (r"/dev/shm has 0.7 MiB free, but the training pipeline needs up to 1.4 MiB there: "
               r"70 pieces of 4 examples in flight .* of 20480 bytes, each in shared-memory blocks of its own"
               r".*--shm-size=1g")
    monkeypatch.setattr(stream.piece_rings, "AVAILABLE", False)  # as on macOS: no rings
    with pytest.raises(DataError, match=refused):
        stream.StreamedData(small_config(folder, **sizes), data_parallel(), ("train",))
    monkeypatch.undo()
    example = {"image": np.zeros((38, 38, 3), np.uint8), "lighting": np.zeros(3, np.float32)}
    smaller = {"image": np.zeros((30, 30, 3), np.uint8), "lighting": np.zeros(3, np.float32)}
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: need - 1)
    with pytest.raises(DataError, match=r"needs up to 1.4 MiB there: 70 pieces"):  # larger than the slots
        stream.check_shared_memory(options, example, "x", 4, slot_example=smaller)
    stream.check_shared_memory(options, example, "x", 4)  # slots sized for it
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: need)  # just enough
    stream.check_shared_memory(options, example, "x", 4, slot_example=smaller)
    in_process = stream.PipelineOptions.of(small_config(folder, num_workers=0))
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: 0)
    monkeypatch.setattr(stream.piece_rings, "AVAILABLE", False)
    stream.check_shared_memory(in_process, example, "x", 4)  # no workers: no shared memory


def test_evaluation_views_cross_in_the_rings_and_without_rings_are_refused_where_they_do_not_fit(
        folder, monkeypatch):
    data = stream.StreamedData(small_config(folder, num_workers=2), data_parallel(), ("train", "eval"))
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: 0)
    for mode in ("center", "ten_crop", "multi_scale"):  # the rings' slots hold the largest views
        with data.eval_passes(mode):
            pass
    # Without rings the eval batch of 4 travels in pieces of 4 as blocks. Four sets of ten
    # 16x16 crops (30,720 bytes) take eight pages; so do a multi-scale piece's four pairs
    # of 24x32 canvases (18,432 bytes, five pages) and of 16x22 ones (8,448 bytes, three
    # pages). Four 16x16 crops (3,072 bytes) travel pickled: center evaluation needs none.
    monkeypatch.setattr(stream.piece_rings, "AVAILABLE", False)
    monkeypatch.setattr(stream, "_free_shared_memory", lambda: 70 * 8 * 4096 - 1)
    for mode in ("ten_crop", "multi_scale"):
        refused = (rf"/dev/shm has 2.2 MiB free, but the {mode} evaluation pipeline needs up to 2.2 MiB "
                   rf"there: 70 pieces of 4 examples .* of 32768 bytes")
        with pytest.raises(DataError, match=refused), data.eval_passes(mode):
            pass
    with data.eval_passes("center"):
        pass


class GrowingExamples:
    """Position -> an example whose array widens with it, as a multi-scale pass's canvases
    do bucket after bucket."""

    def __call__(self, i):
        return {"x": np.full(64 * (1 + i // 16), i, np.int32), "i": np.int32(i)}


@pytest.mark.parametrize("sized", [True, False], ids=["slots for the largest", "slots for the first"])
def test_pieces_larger_than_their_slots_cross_as_blocks_and_slots_sized_for_the_largest_hold_them_all(
        monkeypatch, sized):
    import grain

    seen = []
    leaves = piece_rings.RingReader.leaves
    monkeypatch.setattr(piece_rings.RingReader, "leaves",
                        lambda self, token: seen.append("piece" in token) or leaves(self, token))
    examples = grain.MapDataset.range(48).map(GrowingExamples())
    largest = GrowingExamples()(47) if sized else None
    # Batches of 16, each one piece, each wider than the last: worker 0 writes pieces 0 and
    # 2 (its first piece's slots are too narrow for 2), worker 1 piece 1.
    host = stream.HostBatches(examples, 16, stream.PipelineOptions(2, 1, 1, 1, piece=16), largest=largest)
    try:
        batches = list(host)
    finally:
        host.close()
    assert [b["i"].tolist() for b in batches] == [list(range(k, k + 16)) for k in (0, 16, 32)]
    assert all((b["x"] == b["i"][:, None]).all() and b["x"].shape == (16, 64 * (1 + k)) for k, b in
               enumerate(batches))
    assert seen == [False, False, not sized]  # slots sized for the first: piece 2 as blocks


def test_automatic_workers_share_this_process_cpus_among_the_hosts_training_processes(monkeypatch):
    monkeypatch.setattr(stream.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    for name in (*stream._LOCAL_SIZE_VARIABLES, "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    assert stream.auto_workers() == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert stream.auto_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert stream.auto_workers() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")  # SLURM's CPUs are already this task's own
    assert stream.auto_workers() == 5


@pytest.mark.parametrize("mode, shape", [("center", (4, 16, 16, 3)), ("ten_crop", (4, 10, 16, 16, 3))])
def test_evaluation_reads_every_image_once_in_order_padding_masked(folder, mode, shape):
    data = stream.StreamedData(small_config(folder), data_parallel(), ("train", "eval"))
    labels, masks = [], []
    with data.eval_passes(mode) as one_pass:
        for inputs in one_pass():
            batch = inputs.batch
            assert batch["views"].shape == shape
            labels.append(np.asarray(batch["label"]))
            masks.append(np.asarray(batch["mask"]))
    assert len(masks) == 3  # 9 images in batches of 4: the last holds 1
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    assert masks.tolist() == [True] * 9 + [False] * 3
    np.testing.assert_array_equal(labels[:9], np.repeat([0, 1, 2], 3))


def eval_pass_arrays(one_pass, keys=("views", "label", "mask")):
    return [{k: np.asarray(inputs.batch[k]) for k in keys} for inputs in one_pass()]


def test_one_small_worker_pool_serves_every_evaluation_each_pass_the_whole_set_and_closes(folder,
                                                                                        monkeypatch):
    opened = []
    monkeypatch.setattr(stream, "HostBatches",
                        lambda *args, **kwargs: opened.append(args) or HostBatches(*args, **kwargs))
    config = small_config(folder, num_workers=3, eval_workers=2)
    assert stream.StreamedData(config, data_parallel(), ("eval",)).eval_pipeline.workers == 3  # evaluate.py's
    data = stream.StreamedData(config, data_parallel(), ("train", "eval"))
    assert not opened  # nothing started yet
    with data.eval_passes("center") as one_pass:
        passes = [eval_pass_arrays(one_pass) for _ in range(3)]
        workers = multiprocessing.active_children()
        # One pool of dataset.eval_workers, started at the first pass, still there.
        assert len(opened) == 1 and opened[0][2].workers == 2 and len(workers) == 2
    assert not set(workers) & set(multiprocessing.active_children())  # stopped at the close
    assert [len(batches) for batches in passes] == [3, 3, 3]  # 9 images in batches of 4, each time
    for later in passes[1:]:
        for a, b in zip(passes[0], later, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("mode", ["center", "ten_crop", "multi_scale"])
def test_an_eval_set_smaller_than_the_batch_is_one_batch_of_its_own_size(folder, mode):
    config = small_config(folder)
    config.eval_batch_size = 64
    data = stream.StreamedData(config, data_parallel(), ("train", "eval"))
    assert data.eval_batch_size == 9
    with data.eval_passes(mode) as one_pass:
        batches = eval_pass_arrays(one_pass, ("label", "mask"))
    masks = np.concatenate([batch["mask"] for batch in batches])
    assert {len(batch["label"]) for batch in batches} == {9} and masks.sum() == 9
    if mode != "multi_scale":  # multi-scale pads each canvas bucket to a batch
        assert len(batches) == 1


def test_multi_scale_batches_hold_one_canvas_bucket_each_and_every_image_once(folder):
    # The folder's validation images: per class, two 40x52 landscapes and one 52x40
    # portrait (both 4:3 buckets): 6 + 3 images, in batches of 4 of one bucket each.
    data = stream.StreamedData(small_config(folder), data_parallel(), ("train", "eval"))
    records, buckets = data.multi_scale_plan()
    landscape, portrait = augment.multi_scale_bucket(40, 52), augment.multi_scale_bucket(52, 40)
    assert records.tolist() == [0, 2, 3, 5, 6, 8, -1, -1, 1, 4, 7, -1]
    assert buckets.tolist() == [landscape] * 8 + [portrait] * 4
    shapes, masks, valid = [], [], []
    with data.eval_passes("multi_scale") as one_pass:
        for batch in (inputs.batch for inputs in one_pass()):
            shapes.append(tuple(v.shape for v in batch["views"]))
            masks += np.asarray(batch["mask"]).tolist()
            valid.append(np.asarray(batch["valid"]))
    # Scales 16 and 24: canvases 16 x ceil(16 * 4/3) = 22 and 24 x 32, or their transposes.
    wide, tall = ((4, 2, 16, 22, 3), (4, 2, 24, 32, 3)), ((4, 2, 22, 16, 3), (4, 2, 32, 24, 3))
    assert shapes == [wide, wide, tall]  # two compiled shapes for three batches
    assert masks == [True] * 6 + [False] * 2 + [True] * 3 + [False]
    assert valid[0][0].tolist() == [[16, 21], [24, 31]]  # 40 x 52 at shorter sides 16 and 24
    assert valid[2][0].tolist() == [[21, 16], [31, 24]]


def test_normalization_comes_from_the_training_images(folder):
    per_channel = stream.StreamedData(small_config(folder, normalization="per_channel_mean_std"),
                                      data_parallel(), ("train",)).normalization
    per_pixel = stream.StreamedData(small_config(folder), data_parallel(), ("train",)).normalization
    assert per_channel.mean.shape == (3,) and per_pixel.mean.shape == (16, 16, 3)
    assert 0.3 < float(per_channel.mean[0]) < 0.6 and float(per_channel.std[0]) > 0.2  # classes 0..200 bright
    np.testing.assert_allclose(np.asarray(per_pixel.mean).mean(axis=(0, 1)), per_channel.mean, atol=1e-3)
    assert np.all(np.asarray(per_pixel.std) == 1)


def test_lighting_offsets_are_added_to_every_pixel_before_normalising():
    import jax.numpy as jnp

    norm = stream.Normalization(jnp.full((3,), 0.5), jnp.full((3,), 0.25))
    batch = {"image": jnp.full((2, 4, 4, 3), 255, jnp.uint8), "label": jnp.array([0, 1]),
             "lighting": jnp.array([[0.1, 0.0, -0.1], [0.0, 0.0, 0.0]])}
    images, labels = stream.train_images(stream.StreamedBatch(batch, norm))
    np.testing.assert_allclose(images[0], np.broadcast_to([2.4, 2.0, 1.6], (4, 4, 3)), rtol=1e-6)
    np.testing.assert_allclose(images[1], 2.0)


def test_the_normalization_sample_is_decoded_without_a_worker_pool_giving_the_pools_statistics(folder,
                                                                                             monkeypatch):
    import grain

    config = small_config(folder, num_workers=2)
    # The statistics a pool of 2 workers gives: the sample's center crops through HostBatches.
    data = stream.StreamedData(config, data_parallel(), ("train",))
    sample = stream.normalization_sample(config.seed, len(data.train))
    positions = stream._Positions(len(sample), 0, 1)
    crops = grain.MapDataset.range(len(sample)).map(
        stream._EvalExample(data.train, sample, data.settings, "center", positions))
    pooled = stream.HostBatches(crops, 64, data.pipeline)
    try:
        images = np.concatenate([batch["views"][batch["mask"]] for batch in pooled])
    finally:
        pooled.close()
    mean, std = augment.normalization_stats(images, config.dataset.normalization)

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started for the normalisation sample")

    monkeypatch.setattr(stream.HostBatches, "__init__", no_pool)
    norm = stream.StreamedData(config, data_parallel(), ("train",)).normalization
    assert len(images) == len(sample) and mean.shape == (16, 16, 3)
    np.testing.assert_array_equal(np.asarray(norm.mean), mean)
    np.testing.assert_array_equal(np.asarray(norm.std), std)


@pytest.mark.skipif(not piece_rings.AVAILABLE, reason="no memory files on this system")
def test_a_ring_hands_pieces_over_waits_for_free_slots_and_refuses_another_workers_piece():
    from resnet_jax.data import memory_files

    reader = piece_rings.RingReader(2)
    writer = piece_rings.RingWriter(reader.control, 2, 2)  # two slots: pieces 0, 2 of worker 0
    piece = lambda k: {"x": np.full((4, 8), k, np.float32)}  # noqa: E731
    try:
        tokens = [writer(0, piece(0)), writer(2, piece(2))]
        assert all("piece" not in token for token in tokens)  # in the ring, not pickled
        for k, token in zip((0, 2), tokens, strict=True):
            leaves, _, done = reader.leaves(token)
            assert (leaves[0] == k).all()
            done()
        slow = concurrent.futures.ThreadPoolExecutor(1).submit(writer, 4, piece(4))  # reuses slot 0
        assert (reader.leaves(slow.result(timeout=10))[0][0] == 4).all()  # piece 0 was consumed
        blocked = concurrent.futures.ThreadPoolExecutor(1).submit(writer, 8, piece(8))  # slot 0 not free
        with pytest.raises(concurrent.futures.TimeoutError):
            blocked.result(timeout=0.5)
        reader.stop()  # closed: no worker waits any more
        blocked.result(timeout=10)
        with pytest.raises(RuntimeError, match="input worker 0 of 2 was given a piece of worker 1"):
            writer(1, piece(1))
        pid, fd, device, inode = reader.control
        with pytest.raises(DataError, match="no longer the"):  # the inode is checked
            memory_files.open_mapped((pid, fd, device, inode + 1), 8, writable=False, what="control block")
    finally:
        reader.close()
