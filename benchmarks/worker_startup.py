"""What each input worker process costs a host at start-up, to size pools of hundreds:
file descriptors, memory, the time to start, and the per-worker copy of the dataset.

    python benchmarks/worker_startup.py [--workers 1 2 4 8] [--records 1281167]

For each worker count, a fresh process opens the training pipeline of
`configs/imagenet.py:resnet50` (224x224 crops, the paper's augmentation) on a small
generated image folder and starts its pool (`stream.HostBatches`). It reports:
- the time from the pool's creation to the first batch of 32, and the training process's
  CPU time in it (the part no number of cores spreads: Grain starts the workers from
  threads of this process, each pickling the dataset for its worker);
- each worker's CPU time and memory (PSS and RSS, /proc/PID/smaps_rollup) by then: its
  interpreter, imports and first examples;
- the file descriptors of the training process and of a worker, with the pool started
  and its queues full (after a pause with nothing consumed), and their kinds: the
  pool's own (pipes, sockets, anonymous inodes, files) apart from the memory files
  (`/memfd:...`: the workers' rings, their control block and the shared file list) and
  the shared-memory blocks of examples in flight (`/dev/shm/...`), whose numbers follow
  how examples cross processes, not the pool.
The folder's file list is tiny; `--records` times the pickling of one worker's copy of the
dataset with an image folder of that many files (ImageNet's 1,281,167 by default), whose
file list the workers map rather than copy (`data/shared_arrays.py`). The last line is a
JSON object of the fitted per-worker costs. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

BATCH = 32


def write_images(root: Path, count: int = 64, classes: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), np.uint8)  # smooth once enlarged, like a photograph
        Image.fromarray(pixels).resize((320, 260), Image.BILINEAR).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def descriptors(pid: int | str = "self") -> dict[str, int]:
    """`pid`'s open file descriptors by kind: shm (/dev/shm blocks), arena (multiprocessing's
    heap of shared counters and locks, in /dev/shm but unlinked as soon as made), memfd
    (memory files and their mappings), pipe, socket, anon (anonymous inodes: eventfd,
    epoll), file (anything else)."""
    kinds = dict.fromkeys(("shm", "arena", "memfd", "pipe", "socket", "anon", "file"), 0)
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{fd}")
        except OSError:  # closed meanwhile (or listdir's own descriptor)
            continue
        kind = ("arena" if target.startswith("/dev/shm/pym-") else "shm" if target.startswith("/dev/shm/")
                else "memfd" if target.startswith("/memfd:")
                else "pipe" if target.startswith("pipe:")
                else "socket" if target.startswith("socket:") else "anon" if target.startswith("anon_inode:")
                else "file")
        kinds[kind] += 1
    return kinds


def pool_descriptors(kinds: dict[str, int]) -> int:
    """The descriptors of `descriptors` other than memory files and shared-memory blocks."""
    return sum(n for kind, n in kinds.items() if kind not in ("shm", "memfd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.endswith("kB")}
    return {"pss": fields["Pss"], "rss": fields["Rss"]}


def config_for(data_dir: Path, workers: int):
    from resnet_jax.config import imagenet_recipe

    config = imagenet_recipe("resnet50", "image_folder")
    config.dataset.data_dir = str(data_dir)
    config.dataset.num_workers = workers
    config.batch_size, config.num_train_steps = BATCH, 1000
    return config


def measure(data_dir: Path, workers: int) -> dict:
    """One worker count, in a fresh process."""
    import multiprocessing

    from resnet_jax.data.stream import HostBatches, StreamedData
    from resnet_jax.parallel import data_parallel

    data = StreamedData(config_for(data_dir, workers), data_parallel(), ("train",))
    before = descriptors()
    cpu, start = time.process_time(), time.perf_counter()
    host = HostBatches(data.train_dataset(0), BATCH, data.pipeline)
    try:
        next(host)
        first_batch_s, trainer_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        for _ in range(workers - 1):  # a piece of each worker: every ring mapped
            next(host)
        pool = [p.pid for p in multiprocessing.active_children()]
        started = [(cpu_seconds(pid), memory(pid)) for pid in pool]
        time.sleep(3)  # nothing consumed: every queue and buffer fills
        full = descriptors()
        workers_fds = [descriptors(pid) for pid in pool]
    finally:
        host.close()
    return {
        "workers": workers, "first_batch_s": first_batch_s, "trainer_cpu_s": trainer_cpu_s,
        "worker_cpu_s": float(np.mean([c for c, _ in started])),
        "worker_pss": float(np.mean([m["pss"] for _, m in started])),
        "worker_rss": float(np.mean([m["rss"] for _, m in started])),
        "fds_before": sum(before.values()), "fds_full": full,
        "worker_fds": max(sum(fds.values()) for fds in workers_fds),
        "worker_memfd_fds": max(fds["memfd"] for fds in workers_fds),
        "pool_fds": pool_descriptors(full) - pool_descriptors(before),
        "ring_fds": full["memfd"] - before["memfd"],
    }


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def imagenet_sized_folder(records: int):
    """An image folder of `records` files named as ImageNet's, in its 1,000 classes (fewer
    for fewer records), without the files (`ImageFolder.from_names`)."""
    from resnet_jax.data.image_records import ImageFolder

    classes = [f"n{c:08d}" for c in range(min(records, 1000))]
    names = [[f"{name}_{k}.JPEG" for k in range(c, records, len(classes))] for c, name in enumerate(classes)]
    return ImageFolder.from_names("/data/imagenet/train", classes, names)


def pickled_copy(data_dir: Path, records: int) -> dict:
    """One worker's copy of the training dataset, its image folder replaced by one of
    `records` files (`imagenet_sized_folder`): the seconds to pickle it (in this process)
    and to unpickle it (in the worker), its bytes, the resident memory the unpickled copy
    adds, and after it has read every path; and the bytes of the file list, held once and
    mapped by every worker (those pages count in each reader's RSS, but exist once)."""
    import cloudpickle

    from resnet_jax.data.stream import StreamedData
    from resnet_jax.parallel import data_parallel

    data = StreamedData(config_for(data_dir, 0), data_parallel(), ("train",))
    data.train = imagenet_sized_folder(records)
    shared = data.train.file_list_nbytes
    dataset = data.train_dataset(0)
    start = time.perf_counter()
    pickled = cloudpickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.perf_counter() - start
    before, start = resident_bytes(), time.perf_counter()
    copy = pickle.loads(pickled)  # maps this process's list again, as a worker maps it
    unpickle_s, added = time.perf_counter() - start, resident_bytes() - before
    before, folder = resident_bytes(), pickle.loads(pickle.dumps(data.train))  # the folder alone, mapped
    start = time.perf_counter()
    for index in range(len(folder)):
        folder.describe(index)
    read_s, read = time.perf_counter() - start, resident_bytes() - before
    del copy, folder
    return {"pickle_s": pickle_s, "unpickle_s": unpickle_s, "bytes": len(pickled), "resident_bytes": added,
            "read_every_path_s": read_s, "resident_after_reading_bytes": read, "shared_bytes": shared}


def fit(xs, ys) -> tuple[float, float]:
    """(per worker, fixed) of the least-squares line through the points."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--records", type=int, default=1_281_167, help="file paths in the pickled copy")
    args = parser.parse_args()
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split() if f in ("avx2", "avx512f")})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags {' '.join(flags)}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_images(Path(tmp))
        rows = []
        for workers in args.workers:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as fresh:
                rows.append(fresh.submit(measure, data_dir, workers).result())
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as fresh:
            copy = fresh.submit(pickled_copy, data_dir, args.records).result()
    print("workers  first batch  trainer CPU  worker CPU  worker PSS/RSS   "
          "trainer fds (own + pool + rings + shm)  worker fds (memfd)")
    for r in rows:
        full = r["fds_full"]
        print(f"{r['workers']:7d}  {r['first_batch_s']:9.2f} s  {r['trainer_cpu_s']:9.2f} s  "
              f"{r['worker_cpu_s']:8.2f} s  {r['worker_pss'] / 2**20:5.0f}/"
              f"{r['worker_rss'] / 2**20:3.0f} MiB  "
              f"{r['fds_before']:5d} + {r['pool_fds']:4d} + {r['ring_fds']:3d} + {full['shm']:4d} shm  "
              f"{r['worker_fds']:10d} ({r['worker_memfd_fds']})")
    counts = [r["workers"] for r in rows]
    per_worker = {
        "first_batch_s": fit(counts, [r["first_batch_s"] for r in rows]),
        "trainer_cpu_s": fit(counts, [r["trainer_cpu_s"] for r in rows]),
        "pool_fds": fit(counts, [r["pool_fds"] for r in rows]),
        "ring_fds": fit(counts, [r["ring_fds"] for r in rows]),
        "arena_fds": fit(counts, [r["fds_full"]["arena"] for r in rows]),
        "shm_fds": fit(counts, [r["fds_full"]["shm"] for r in rows]),
    }
    for name, (slope, intercept) in per_worker.items():
        print(f"{name}: {slope:.3f} per worker + {intercept:.2f}")
    print(f"one worker's copy of the dataset with {args.records:,} file paths: "
          f"{copy['bytes'] / 2**10:.0f} KiB, "
          f"pickled in {copy['pickle_s'] * 1e3:.1f} ms, unpickled in {copy['unpickle_s'] * 1e3:.1f} ms, "
          f"{copy['resident_bytes'] / 2**20:.1f} MiB resident once unpickled, "
          f"{copy['resident_after_reading_bytes'] / 2**20:.1f} MiB after reading every path "
          f"({copy['read_every_path_s']:.2f} s) of the {copy['shared_bytes'] / 2**20:.1f} MiB list "
          "shared by every worker")
    print(json.dumps({
        "per_worker": {name: slope for name, (slope, _) in per_worker.items()},
        "fixed": {name: intercept for name, (_, intercept) in per_worker.items()},
        "worker_cpu_s": float(np.mean([r["worker_cpu_s"] for r in rows])),
        "worker_pss_bytes": float(np.mean([r["worker_pss"] for r in rows])),
        "worker_rss_bytes": float(np.mean([r["worker_rss"] for r in rows])),
        "worker_fds": max(r["worker_fds"] for r in rows),
        "worker_memfd_fds": max(r["worker_memfd_fds"] for r in rows),
        "trainer_fds_before_pool": rows[0]["fds_before"],
        "records": args.records, "dataset_copy": copy, "runs": rows,
    }))


if __name__ == "__main__":
    main()
