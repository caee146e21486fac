"""The work folder of a streaming run: results kept on disk as they are computed, so an interrupted run continues.

A run over many images (``inference_artist.py`` on a folder, the embedding of ``tools/build_gallery.py``) appends
each batch's results to a work folder next to its output (``<output>.partial``) and assembles the final files from
it at the end; the same command with ``--resume`` continues an interrupted run from its last committed batch::

    <output>.partial/
        run.json            what the run was started with (``identity``), its image count, parts and notes
        part-00000/         the images [start, stop) of the sorted image list, one folder per part
            progress.json   the committed state: images done, rows, each file's committed length, counters
            features.f32    raw float32 rows, one per readable image (the run's own files: any names)
            names.txt       ...

A part is appended to batch by batch and committed every :data:`COMMIT_SECONDS` and when it ends or is interrupted:
its files are synced, then ``progress.json`` is replaced atomically. Bytes past the committed lengths belong to a
batch that was torn (killed mid-write) or not committed, and are cut off when the run continues, so a resumed run
recomputes exactly the batches after the last committed one. Parts are independent folders keyed by their range:
a run of one process has one part; a sharded run (``torchrun``, :mod:`inference.sharding`) has one part per
process (:func:`shard_ranges`), each written by its own process, and the reader (:meth:`Part.lines`,
:meth:`Part.chunks`) assembles the outputs part after part. One process can continue any run (it runs every
unfinished part in turn); several continue a run of as many parts only.
"""

import contextlib
import copy
import hashlib
import io
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artifacts.atomic import OutputSet, write_error
from errors import UserError

FORMAT = "lsnet-work-folder"
VERSION = 1
RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
COMMIT_SECONDS = 2.0  # at most this much computing is lost to a crash (a commit syncs every file of the part)
SUFFIX = ".partial"


def work_folder_for(output: str | os.PathLike) -> Path:
    """The work folder of an output folder or file: ``<output>.partial`` beside it."""
    output = Path(os.path.abspath(output))
    return output.with_name(output.name + SUFFIX)


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A file (or a folder's files) as path, size and modification time: a changed file gets another identity."""
    path = Path(os.path.abspath(path))
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"path": str(path),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}}


def list_identity(names: Sequence[str]) -> str:
    """A list of names as its length and SHA-256 (hashed name by name: no joined copy of a million names)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return f"{len(names)} images, sha256 {digest.hexdigest()[:16]}"


def shard_ranges(count: int, shards: int, step: int = 1) -> list[list[int]]:
    """``[start, stop)`` of each of ``shards`` consecutive, nearly equal parts of ``count`` items, every boundary a
    multiple of ``step`` (the batch size: each part's batches are those a one-process run makes)."""
    cuts = [step * (count * i // shards // step) for i in range(shards)] + [count]
    return [[start, stop] for start, stop in itertools.pairwise(cuts)]


@dataclass
class Progress:
    """The committed state of a part: images of its range done (readable and skipped), readable rows, the
    committed length of each file and the run's counters."""

    done: int = 0
    rows: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


def _write_json(folder: Path, name: str, record: dict[str, Any]) -> None:
    with OutputSet(folder) as out, out.open(name) as f:
        f.write(json.dumps(record, ensure_ascii=False, indent=1) + "\n")


def _read_json(path: Path, work: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"the work folder {work} is damaged ({path.name}: {err}); delete it and run again without "
                        "--resume") from None


class Part:
    """The images ``[start, stop)`` of a run's sorted list: its folder, committed progress, appender and reader."""

    def __init__(self, folder: Path, start: int, stop: int):
        self.folder, self.start, self.stop = folder, start, stop
        self.reload()

    def reload(self) -> None:
        """Read the committed progress (again: another process of a sharded run may be writing the part)."""
        path = self.folder / PROGRESS_FILE
        self.progress = Progress(**_read_json(path, self.folder.parent)) if path.is_file() else Progress()

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def complete(self) -> bool:
        return self.progress.done >= self.size

    def writer(self, files: tuple[str, ...], shown_as: dict[str, Path] | None = None) -> "PartWriter":
        """An appender of ``files`` from the committed state on (bytes past it are cut off)."""
        return PartWriter(self, files, shown_as or {})

    def _committed(self, name: str) -> int:
        return self.progress.sizes.get(name, 0)

    def chunks(self, name: str, size: int = 16 * 2**20) -> Iterator[bytes]:
        """The committed bytes of file ``name``, ``size`` bytes at a time."""
        left = self._committed(name)
        if not left:
            return
        with open(self.folder / name, "rb") as f:
            while left:
                chunk = f.read(min(size, left))
                if not chunk:
                    raise UserError(f"the work folder {self.folder.parent} is damaged ({name} is shorter than its "
                                    "progress record); delete it and run again without --resume")
                left -= len(chunk)
                yield chunk

    def lines(self, name: str) -> Iterator[str]:
        """The committed lines of text file ``name``, without their line ends."""
        tail = b""
        for chunk in self.chunks(name):
            *complete, tail = (tail + chunk).split(b"\n")
            for line in complete:
                yield line.decode("utf-8")


class PartWriter:
    """Appends batches to a part's files; commits every :data:`COMMIT_SECONDS` and when it is closed (also on an
    exception or Ctrl-C, with the batches appended completely). Use it as a context manager."""

    def __init__(self, part: Part, files: tuple[str, ...], shown_as: dict[str, Path]):
        self.part, self.shown_as = part, shown_as
        self.state = copy.deepcopy(part.progress)
        self.files: dict[str, io.FileIO] = {}
        part.folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            path = part.folder / name
            committed = part._committed(name)
            if (path.stat().st_size if path.exists() else 0) < committed:
                raise UserError(f"the work folder {part.folder.parent} is damaged ({name} is shorter than its "
                                "progress record); delete it and run again without --resume")
            with self._guard(name):
                self.files[name] = open(path, "ab", buffering=0)  # a failed write fails at once
                self.files[name].truncate(committed)  # a torn or uncommitted batch
        self.last_commit = time.monotonic()

    @contextlib.contextmanager
    def _guard(self, name: str) -> Iterator[None]:
        """A failed write of file ``name`` as one line naming the file it becomes (and how to continue)."""
        try:
            yield
        except OSError as err:
            raise write_error(self.shown_as.get(name, self.part.folder / name), err,
                              f", then add --resume to continue from {self.part.folder.parent}") from None

    def append(self, done: int, rows: int, data: dict[str, bytes], counters: dict[str, int] | None = None) -> None:
        """One batch: ``done`` more images of the part (``rows`` of them readable), bytes for each file, counts."""
        for name, payload in data.items():
            view = memoryview(payload)
            with self._guard(name):
                while view:  # an unbuffered write may write part and fail on the rest
                    view = view[self.files[name].write(view):]
        state = copy.deepcopy(self.state)
        state.done += done
        state.rows += rows
        for name, payload in data.items():
            state.sizes[name] = state.sizes.get(name, 0) + len(payload)
        for key, value in (counters or {}).items():
            state.counters[key] = state.counters.get(key, 0) + value
        self.state = state  # one assignment: a Ctrl-C leaves the previous batch's state or this one's
        if time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Sync the files, then record the appended batches as done (atomically)."""
        for name, f in self.files.items():
            with self._guard(name):
                os.fsync(f.fileno())
        _write_json(self.part.folder, PROGRESS_FILE, asdict(self.state))
        self.part.progress = copy.deepcopy(self.state)
        self.last_commit = time.monotonic()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self.commit()  # on an exception or Ctrl-C too: the batches appended completely are kept
        except (OSError, UserError):
            if exc_type is None:
                raise  # else the error being raised is the one to report
        finally:
            for f in self.files.values():
                f.close()


class WorkFolder:
    """A run's work folder: ``run.json`` and its parts (see the module docstring)."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record
        self.parts = [Part(path / f"part-{i:05d}", start, stop) for i, (start, stop) in enumerate(record["parts"])]

    @property
    def notes(self) -> dict[str, Any]:
        """What the run stored at its start for the end (e.g. files skipped before the run)."""
        return self.record["notes"]

    @property
    def done(self) -> int:
        return sum(part.progress.done for part in self.parts)

    @classmethod
    def start(cls, path: str | os.PathLike, identity: dict[str, Any], count: int, resume: bool,
              notes: dict[str, Any] | None = None, shards: int = 1, step: int = 1) -> "WorkFolder":
        """Continue the run in ``path`` (``resume``: it must have been started with the same ``identity``, and with
        ``shards`` parts unless ``shards`` is 1) or start one over ``count`` images in ``shards`` parts cut at
        multiples of ``step`` (a folder holding finished batches is refused without ``resume``)."""
        path = Path(path)
        cls.check(path, resume)
        if resume:
            work = cls.join(path, identity)
            if shards > 1 and len(work.parts) != shards:
                raise UserError(f"--resume: {path} was started by {len(work.parts)} process(es), this run has "
                                f"{shards}; continue it with {len(work.parts)} (torchrun --nproc_per_node and "
                                "--nnodes) or with one process")
            return work
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"cannot create the work folder {path} ({err.strerror}); free some space or write the "
                            "output elsewhere") from None
        record = {"format": FORMAT, "version": VERSION, "identity": json.loads(json.dumps(identity)),
                  "count": count, "parts": shard_ranges(count, shards, step), "notes": notes or {}}
        _write_json(path, RUN_FILE, record)
        return cls(path, record)

    @classmethod
    def check(cls, path: str | os.PathLike, resume: bool) -> None:
        """The refusals that need no model: ``resume`` without a run in ``path``, a new run over finished batches."""
        path = Path(path)
        exists = (path / RUN_FILE).is_file()
        if resume and not exists:
            raise UserError(f"--resume: no interrupted run to continue ({path} does not exist or holds no {RUN_FILE}); "
                            "run without --resume")
        if not resume and exists:
            old = cls(path, _read_json(path / RUN_FILE, path))
            if old.done:
                raise UserError(f"{path} holds an interrupted run ({old.done} of {old.record['count']} images done); "
                                f"add --resume to continue it, or delete {path} to start over")

    @classmethod
    def join(cls, path: str | os.PathLike, identity: dict[str, Any]) -> "WorkFolder":
        """The run in ``path``, which must have been started with the same ``identity`` (to continue it, or to work
        on a part of it: another process of a sharded run)."""
        path = Path(path)
        identity = json.loads(json.dumps(identity))  # as it reads back from run.json
        record = _read_json(path / RUN_FILE, path)
        if record.get("format") != FORMAT or record.get("version") != VERSION:
            raise UserError(f"--resume: {path} is not a work folder of this version; delete it and run without "
                            "--resume")
        for key in dict.fromkeys([*record["identity"], *identity]):
            old, new = record["identity"].get(key), identity.get(key)
            if old != new:
                raise UserError(f"--resume: {path} was started with another {key} ({_short(old)} then, "
                                f"{_short(new)} now); continue it with the original command, or delete it to start "
                                "over")
        return cls(path, record)

    def remove(self) -> None:
        """Delete the folder (its outputs are assembled)."""
        shutil.rmtree(self.path, ignore_errors=True)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."
