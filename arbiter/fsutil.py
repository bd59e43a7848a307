"""Atomic directories, shared by the heads package (saving a head) and training (every artifact): build in a
temporary sibling directory, fsync every file, make it readable by other users, rename it into place. Also the
bounded JSON-object reader both loaders use for their config files (head_config.json, an SAE's cfg.json).

A killed writer never leaves a partial directory where a loader would find it: the target either does not exist,
or is the old complete version, or the new complete version. Imports nothing of arbiter, so ``arbiter.heads`` can
use it without the training stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


def read_json_object(path: Path, max_bytes: int, error: type[Exception], what: str = "config",
                     shown: Path | str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (the loader's exception type) for a file over ``max_bytes``, text that
    is not UTF-8 JSON, or JSON that is not an object. ``shown``: how messages name the file (default ``path``)."""
    name = shown if shown is not None else path
    if path.stat().st_size > max_bytes:
        raise error(f"{name}: {what} larger than {max_bytes} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{name}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{name}: expected a JSON object")
    return raw


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the file
    system does not offer it (the caller then falls back to two renames)."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not supported here: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: write files into tmp`` -> ``out`` appears whole or not at all.

    On success the files are fsynced, made readable by other users (0644 / 0755 under the umask: the service may
    run as another user than the trainer) and the directory swapped with ``out`` in one atomic exchange (Linux; elsewhere the old one is renamed away
    first, two renames, never a partial directory). On any exception the temporary is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        mask = _umask()
        for dirpath, dirs, files in os.walk(tmp):
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644 & ~mask)
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755 & ~mask)
        fsync_tree(tmp)
        os.chmod(tmp, 0o755 & ~mask)  # mkdtemp makes 0700
        if target.exists():
            if exchange(tmp, target):  # one atomic step: ``target`` is never missing, even for a moment
                shutil.rmtree(tmp, ignore_errors=True)  # now the old version
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                old.rmdir()
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
