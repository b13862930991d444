"""Where a run's files live: a workdir given as a local path or as a Google Cloud Storage
URL (`gs://bucket/path`), turned into an `etils.epath.Path`, the path type Orbax uses.

pathlib reads "gs://b/x" as the relative path "gs:/b/x", a local folder on each host's own
disk, so every workdir path goes through `workdir_path`: local paths become absolute,
`gs://` URLs stay URLs, and a `gs://` workdir this process cannot reach is refused, with
what to install, before anything is compiled or written.

A `gs://` workdir is reached by two clients: etils (config.json, metrics.jsonl, moving
damaged checkpoints) through gcsfs or tensorflow, and Orbax's arrays through tensorstore's
own GCS driver (installed with Orbax). Both find credentials the usual way (Application
Default Credentials) and an emulator through their environment (`STORAGE_EMULATOR_HOST`
for gcsfs, `TENSORSTORE_GCS_HTTP_URL` for tensorstore).

Object storage differs from a disk where writers here care: an object is uploaded whole
or not at all (no temporary file and rename is needed for an atomic write, and a rename
there is a copy), and an object cannot be appended to (see `metrics.MetricWriter`).
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

OBJECT_STORAGE_SCHEMES = ("gs",)
# etils reaches gs:// through tensorflow's file system when tensorflow is installed,
# through fsspec's gcsfs otherwise.
GCS_CLIENTS = ("gcsfs", "tensorflow")
GCS_INSTALL = "pip install -e '.[gcs]' (gcsfs)"


class WorkdirError(RuntimeError):
    """A workdir that this run must not use, or that holds no usable checkpoint."""


def _scheme(text: str) -> str | None:
    scheme, sep, _ = text.partition("://")
    return scheme if sep and scheme.isalnum() else None


def workdir_path(workdir: str | os.PathLike[str]) -> epath.Path:
    """`workdir` as an epath.Path: a local path made absolute, a `gs://` URL kept as is.

    Raises WorkdirError for another URL scheme, for a mangled `gs:/` (one slash: a local
    folder named "gs:" is never what was meant), and for `gs://` without a client for it.
    """
    text = os.fspath(workdir)
    scheme = _scheme(text)
    if scheme is None:
        if text.startswith(tuple(f"{s}:" for s in OBJECT_STORAGE_SCHEMES)):
            raise WorkdirError(f"workdir {text!r}: a URL needs two slashes, e.g. gs://bucket/run")
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if scheme not in OBJECT_STORAGE_SCHEMES:
        raise WorkdirError(
            f"workdir {text!r}: {scheme}:// is not supported; use a local path or gs://bucket/path"
        )
    if not any(importlib.util.find_spec(client) is not None for client in GCS_CLIENTS):
        raise WorkdirError(
            f"workdir {text!r}: gs:// needs gcsfs (or tensorflow) to read and write files there, "
            f"and neither is installed: {GCS_INSTALL}"
        )
    _list_afresh()
    return epath.Path(text)


def _list_afresh() -> None:
    """gcsfs keeps each folder's listing for the life of its file system object; other
    processes change them (the other hosts, a run resuming in a workdir an evaluation is
    reading), and Orbax finds its steps by listing, so every listing asks the bucket."""
    if importlib.util.find_spec("fsspec") is not None:  # absent where tensorflow serves gs://
        import fsspec

        fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def check_reachable(path: epath.Path) -> None:
    """Refuse a workdir that cannot be used: an object-storage one that cannot be listed (no
    network, no credentials, no permission), a local one that is, or lies below, a file. A
    command calls this first, so that the client's own error (a traceback from gcsfs or
    tensorflow, which etils uses where it is installed) or the one of making the folder
    becomes one paragraph naming the path, before anything is compiled or written."""
    if not is_object_storage(path):  # read with os.path: nothing of a storage client
        existing = os.fspath(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            what = "is a file" if existing == os.fspath(path) else f"lies below {existing}, a file"
            raise WorkdirError(f"workdir {path} {what}: a workdir is a folder, new or written by "
                               "train.py, where a run keeps config.json, metrics.jsonl and its "
                               "checkpoints; pass another --workdir")
        return
    try:
        path.exists()
    except Exception as error:  # each client raises its own types: gcsfs, google-auth, tensorflow
        cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise WorkdirError(
            f"workdir {os.fspath(path)} cannot be reached ({type(error).__name__}: {cause}); "
            "check the network, the credentials (gcloud auth application-default login) and "
            "the bucket's name, or use a local --workdir"
        ) from None


def is_object_storage(path: epath.Path) -> bool:
    return _scheme(os.fspath(path)) is not None


def write_text_atomically(path: epath.Path, text: str) -> None:
    """Write `path` so that a reader (or a kill) never sees half of it."""
    if is_object_storage(path):
        path.write_text(text)  # one upload: the object appears whole or not at all
        return
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)
