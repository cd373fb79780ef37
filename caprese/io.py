"""Files a run writes: atomic writes, checksums, append-only logs, the cache folder.

Nothing a run writes is ever read back half-written: whole files go to a temporary name and
are renamed into place; logs are appended line by line and flushed at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "CAPRESE_CACHE"


def cache_dir() -> Path:
    """Root of caprese's cache: $CAPRESE_CACHE, else the platform's user cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return platformdirs.user_cache_path("caprese")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a written file gets the permissions
# any new file would (a shared adapter must be readable by the people it is shared with).
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """write(tmp_path) then rename over path: readers see the old file or the new one. The
    folder is made first, so a result path in a new folder needs nothing from the caller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def append_log(path: Path, record: dict) -> None:
    """One JSON line per event; flushed at once so a killed run keeps its log. After a kill
    tore the last line, the next record starts on a line of its own (readers skip the torn one)."""
    text = json.dumps(record) + "\n"
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                text = "\n" + text
    with open(path, "a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def json_object_with(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether `path` holds a JSON object with all of `keys` (how a command recognises the
    result files it wrote itself)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and all(key in record for key in keys)


def refuse_foreign(path: Path, ours: bool, what: str) -> None:
    """Refuse to overwrite `path` unless it does not exist or `ours` (written by caprese)."""
    if path.exists() and (path.is_dir() or not ours):
        raise ValueError(f"{path} exists and is not {what}: choose another output path "
                         "(caprese never overwrites files it did not write)")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files a killed atomic_write of `path` left beside it."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
