"""Writing files: the one atomic write (a file, a folder), JSON, figures.

Everything the product writes goes through a temporary name beside the target and a rename, so a
crash, a full disk or a signal never leaves a half-written file or folder that looks complete.
Temporary names are ``.<name>.<pid>.<random>.tmp`` (files) and ``.<name>.tmp-<pid>-<random>``
(folders); ``clean_leftovers`` removes those a killed process left behind.

The lowest floor: imports nothing from the package, so stages and edges alike can use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

LEFTOVER_SECONDS = 24 * 3600  # a temporary untouched this long is stale whatever its pid says


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], mode: int | None = None
) -> Path:
    """Call ``write(handle)`` on a fresh temporary file beside ``path``, then rename it into place.

    The file gets the usual umask-based permissions, or ``mode`` (e.g. 0o600 for a secret).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a write through a file object names no file: name the target
            exc.filename = str(path)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data), mode)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """JSON with NaN and infinities written as null, atomically."""
    return write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain, and non-finite floats made None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110, tight: bool = True) -> Path:
    """A matplotlib figure as a PNG (cropped to its content unless ``tight=False``), written atomically."""
    crop = {"bbox_inches": "tight"} if tight else {}
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, **crop))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final``.

    Leftovers of earlier killed runs beside ``final`` are removed first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a report folder is as readable as any
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_leftovers(folder: Path, name: str) -> list[Path]:
    """Remove the temporaries of ``folder/name`` that a killed process left behind.

    Each temporary name carries its writer's pid; one whose process is gone is removed at once
    (a SIGKILL or a power cut leaves it), and any older than ``LEFTOVER_SECONDS`` regardless (its
    writer ran on another host sharing the folder, or the pid was reused).
    """
    removed = []
    cutoff = time.time() - LEFTOVER_SECONDS
    with contextlib.suppress(OSError):
        for path in folder.glob(f".{name}.*"):
            match = _PID.match(path.name[len(name) + 2 :])
            try:
                if not (match and not _alive(int(match.group(1)))) and path.lstat().st_mtime > cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
            except OSError:
                continue
    return removed


_PID = re.compile(r"(?:tmp-|old-)?(\d+)(?:[.-]|$)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
