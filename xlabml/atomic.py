"""Atomic file writes: every file a user keeps (checkpoints, exports, tokenizers, dumps) appears complete or not
at all.

The content goes to a hidden temporary file in the target's own folder (so the final step is a rename on one file
system, never a copy), is flushed to disk, and is then moved into place: with ``overwrite=False`` by ``os.link``,
which fails if the target exists (the "never overwrite" rule holds even against another process racing us), with
``overwrite=True`` by ``os.replace``. A failure at any point (an exception from the writer, a full disk, a
``KeyboardInterrupt``) removes the temporary file and leaves the target as it was. A process killed outright
(SIGKILL, power loss) may leave a hidden ``.NAME.XXXXXXXX.tmp`` next to the target, never a partial target.
"""
from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path (an empty file) in ``path``'s folder; on leaving the block without an exception,
    its content is synced to disk and moved to ``path``.

    Use it with writers that take a file name (``torch.save``, ``safetensors.torch.save_file``)::

        with atomic_path("model.ckpt") as tmp:
            torch.save(state, tmp)

    Args:
        path: the final file. Its folder is created if needed.
        overwrite: replace an existing ``path`` (False: raise ``FileExistsError``, before writing anything if
            ``path`` exists already, else when moving into place, and leave the existing file untouched).
    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        _sync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_into_place(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _sync_folder(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = False) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; see ``atomic_path``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _create_temporary(path: Path) -> Path:
    # os.open with 0o666 honours the umask like a plain open() (tempfile.mkstemp would make it 0600)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _link_into_place(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as error:
        # file systems without hard links (some network and FUSE mounts): check, then rename
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; refusing to overwrite it") from None
        os.rename(tmp, path)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows syncing a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
