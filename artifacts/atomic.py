"""Write a set of files into a folder so that a reader sees the old complete set or the new complete set.

::

    with OutputSet(folder) as out:
        with out.open("features.npy", "wb") as f:
            np.save(f, features)
        with out.open("image_names.txt") as f:  # text: UTF-8, "\\n" line ends
            f.writelines(f"{name}\\n" for name in names)

What is guaranteed:

- Each file is written to a hidden temporary file in the destination folder (``.NAME.XXXXXXXX.tmp``), flushed and
  synced to disk. Nothing replaces the old files until every file of the set is complete.
- A failed write (full disk, quota, no permission, read-only file system) or any exception inside the ``with`` block
  replaces nothing and removes the temporary files: the folder keeps its previous files untouched. A write failure
  is a one-line :class:`UserError` naming the file that could not be written.
- At the end of the ``with`` block the files are renamed over the old ones, one atomic ``os.replace`` each, in the
  order they were opened (open the file that indexes the others, e.g. ``image_names.txt``, last), then the folder
  is synced. Renames within one folder need no new space, so they do not fail on a full disk. Only a crash or a
  reader falling in the microseconds between two renames can see a mix of old and new files.
"""

import contextlib
import errno
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

from errors import UserError

_WRITE_HINTS = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some of your disk quota or write elsewhere",
    errno.EACCES: "check the folder's permissions or write elsewhere",
    errno.EPERM: "check the folder's permissions or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
}


def write_error(path: Path, err: OSError, then: str = "") -> UserError:
    """The one-line error for a failed write of ``path`` (what failed, what to do, ``then`` what, that nothing was
    replaced)."""
    hint = _WRITE_HINTS.get(err.errno, "write elsewhere")
    reason = err.strerror or str(err) or type(err).__name__
    return UserError(f"cannot write {path} ({reason}); {hint}{then} (existing files there were left unchanged)")


def _create_temp(path: Path) -> BinaryIO:
    """Create ``path`` (which must not exist) for writing: the low-level file every output goes through."""
    return open(path, "xb")


class OutputSet:
    """A set of files written together into ``folder`` (see the module docstring for the guarantee)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._pending: list[tuple[Path, Path]] = []  # (temporary file, destination), in opening order

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    @contextlib.contextmanager
    def open(self, name: str, mode: str = "w") -> Iterator[IO]:
        """A new file ``name`` of the set, for writing in text (``"w"``, UTF-8) or binary (``"wb"``) mode."""
        if mode not in ("w", "wb"):
            raise ValueError(f"mode {mode!r}: use 'w' or 'wb'")
        path = self.folder / name
        tmp = self.folder / f".{name[:64]}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            raw = _create_temp(tmp)
        except OSError as err:
            raise write_error(path, err) from None
        self._pending.append((tmp, path))
        file: IO = raw if mode == "wb" else io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        try:
            with file:
                yield file
                file.flush()
                os.fsync(file.fileno())
        except OSError as err:
            raise write_error(path, err) from None

    def commit(self) -> None:
        """Rename every written file over its destination, in opening order, and sync the folder."""
        folder = next((path for _, path in self._pending if path.is_dir()), None)
        if folder is not None:
            self.discard()
            raise UserError(f"cannot write {folder}: a folder of that name is in the way; move it or write elsewhere")
        for i, (tmp, path) in enumerate(self._pending):
            try:
                os.replace(tmp, path)
            except OSError as err:
                self._pending = self._pending[i:]
                self.discard()
                raise write_error(path, err) from None
        self._pending = []
        if os.name == "posix":
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                with contextlib.suppress(OSError):  # some file systems cannot sync a folder; the files are synced
                    os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Remove the temporary files; the destination files stay as they were."""
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []
