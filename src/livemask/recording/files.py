"""Side files of a recording written in whole blocks, and the check that the run folder is
still where it was.

A buffered text file that hits a full disk keeps what it could not write in its buffer and
drops it when closed: lines counted as written never reach the disk, and a block of lines
may be cut in the middle. :class:`BlockFile` writes each block (a ``frames.jsonl`` line, a
frame's CSV rows) with unbuffered writes and, if the write fails, cuts the file back to
where the block began, so the file holds whole blocks only and a block is on disk (in the
OS's cache) when :meth:`BlockFile.write` returns.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

__all__ = ["BlockFile", "folder_id", "folder_lost"]


class BlockFile:
    """An append-only file written one whole block at a time."""

    def __init__(self, path: Path, mode: Literal["a", "w"] = "a") -> None:
        self.path = path
        self._file = open(path, mode + "b", buffering=0)  # noqa: SIM115 (closed by close())
        self._size = self._file.seek(0, os.SEEK_END)

    def write(self, text: str) -> None:
        """Append ``text`` whole, or raise ``OSError`` and leave the file as it was."""
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                written = self._file.write(data)
                data = data[written or 0:]
        except OSError:
            with contextlib.suppress(OSError):  # cut off the part that was written
                self.cut(self._size)
            raise
        self._size = self._file.tell()

    @property
    def size(self) -> int:
        """Bytes written so far (whole blocks)."""
        return self._size

    def cut(self, size: int) -> None:
        """Take back what was written after ``size`` bytes (a block that belongs to a
        record that could not be written); ``OSError`` if it cannot."""
        os.ftruncate(self._file.fileno(), size)
        self._file.seek(size)
        self._size = size

    def linked(self) -> bool:
        """Whether the file still has a name on disk (not deleted while open)."""
        try:
            return os.fstat(self._file.fileno()).st_nlink > 0
        except OSError:
            return False

    def sync(self) -> None:
        """Ask the OS to put the file on disk."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def folder_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder ``path``, or None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def folder_lost(
    path: Path, files: list[BlockFile], expected: tuple[int, int] | None = None
) -> str | None:
    """Why the run folder ``path`` can no longer be written to (deleted, moved, replaced by
    another folder of that name: ``expected`` is its :func:`folder_id` at the start, a side
    file deleted), or None while it is in place."""
    now = folder_id(path)
    if now is None or (expected is not None and now != expected):
        return f"the recording folder {path} was deleted or moved while recording"
    lost = [f.path.name for f in files if not f.linked()]
    if lost:
        return f"{', '.join(lost)} in {path} deleted while recording"
    return None
