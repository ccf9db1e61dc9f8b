"""Atomic file writes: every file bayesprune writes is complete or absent, never half written.

:func:`atomic_write` writes to a temporary file in the target's folder and renames it over the
target (``os.replace``, atomic on POSIX and Windows within one file system). So a full disk, a
read-only target, an exception or Ctrl-C in the middle of a write leave the previous file (or no
file) and no temporary behind. It refuses a target that exists and is not a regular file (a
symbolic link, a folder, a device such as ``/dev/full``): renaming over it would replace the link
or the device node itself. A new file gets the mode a plain ``open(path, "w")`` would give it
(``0o666`` less the umask), whatever the writer library does; a replaced file keeps its mode.

Failures are ``OSError`` with a message that names the file and the cause, including the errors
that the safetensors library reports in its own exception type.

Example
-------
>>> import os, tempfile
>>> from bayesprune.files import atomic_write, write_text
>>> d = tempfile.mkdtemp()
>>> write_text(os.path.join(d, "a.txt"), "hello\\n")
>>> def broken(tmp):
...     open(tmp, "w").write("half")
...     raise RuntimeError("the writer failed")
>>> atomic_write(os.path.join(d, "a.txt"), broken)
Traceback (most recent call last):
...
RuntimeError: the writer failed
>>> open(os.path.join(d, "a.txt")).read(), sorted(os.listdir(d))
('hello\\n', ['a.txt'])
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "check_target", "write_json", "write_text"]


def _read_umask() -> int:
    """The process umask, read once at import (changing it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def check_target(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if a file can be written there; otherwise an ``OSError`` saying why.

    The folder must exist; an existing target must be a regular file (not a link, folder or
    device).
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {path}: folder {parent} does not exist; create it first"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise FileExistsError(
            f"refusing to write {path}: it is {kind}, and bayesprune only replaces regular "
            "files; remove it or choose another path"
        )
    return path


def atomic_write(path: str | os.PathLike, writer: Callable[[str], Any]) -> None:
    """Call ``writer(tmp)`` to write a temporary file, then rename it to ``path``.

    On any failure (``KeyboardInterrupt`` included) the temporary file is removed and the error
    re-raised; ``path`` keeps its previous content. Errors of the writer that are I/O failures
    in disguise (safetensors' ``SafetensorError`` for a full disk) become ``OSError``.
    """
    path = check_target(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    try:
        try:
            writer(tmp)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
        except Exception as exc:
            if type(exc).__name__ == "SafetensorError":
                raise OSError(f"cannot write {path}: {exc}") from None
            raise
        try:  # a replaced file keeps its mode; a new one gets open()'s
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any, *, default: Callable | None = None) -> None:
    """Write ``obj`` as indented JSON atomically (serialised first, so a non-serialisable
    object leaves no file at all)."""
    write_text(path, json.dumps(obj, indent=2, default=default) + "\n")
