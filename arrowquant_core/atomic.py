"""Atomic file writes: a temporary file next to the target, renamed over it when whole.

One mechanism for every file the project writes (artifacts, safetensors, JSON, JSONL,
reports): a crash or an error never leaves a half-written file at the target and never
destroys the previous one (safetensors' "write to tempfile + rename"). The temporary
file sits in the target's folder, so ``os.replace`` stays on one filesystem and is atomic.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
import re
import secrets
from typing import IO, Final


def open_temp(path: Path) -> tuple[IO[bytes], Path]:
    """Create a fresh temp file next to ``path``; returns ``(handle, temp path)``.
    The folder must exist (callers that create folders do so themselves).

    ``os.open`` with mode 0o666 lets the umask decide the permissions, as for a plain
    ``open``; ``tempfile`` would force 0o600 onto the final file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb"), tmp


def commit(handle: IO[bytes], tmp: Path, path: Path) -> None:
    """Flush to disk, rename the temp file over ``path``, and fsync the folder so the
    rename itself survives a power loss (the rename is a change to the folder)."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a folder (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the data itself was synced
    finally:
        os.close(fd)


_TEMP_NAME: Final = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files that killed writes left in ``folder`` (the ``open_temp`` naming
    only); returns what was removed. Call it only where no other writer is active (the
    harness does, at the start of a run, for its ``--out`` folder)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if _TEMP_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def discard(handle: IO[bytes], tmp: Path) -> None:
    handle.close()
    tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temp file, then commit it to ``path``; on any error the
    temp file is removed and ``path`` is left as it was."""
    target = Path(path)
    handle, tmp = open_temp(target)
    try:
        write(handle)
        commit(handle, tmp, target)
    except BaseException:
        discard(handle, tmp)
        raise
    return target


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    >>> write_bytes_atomic("/tmp/arrowquant-doc.bin", b"ok").read_bytes()
    b'ok'
    """
    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    return write_atomic(path, write)
