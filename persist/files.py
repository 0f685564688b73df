"""Files written whole or not at all, and JSON read with one error wording. Standard library only.

Every write goes to a temporary file beside its target, is fsynced, renamed over the target and made durable by an
fsync of the directory: a crash (or a writer that raises) at any point leaves the old file or the new one under the
real name, never half of one, and no temporary file behind.

    atomic_write_json(run / "eval.json", report)
    atomic_write(out / "image.png", lambda tmp: image.save(tmp, format="PNG"))   # any writer that takes a path
    config = read_json_object(model / "config.json")
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

# JSON files we read are configs, manifests and indexes (kilobytes) or a data set's catalogue (megabytes): a file far
# larger is a mistake or an attack, refused before it is read into memory.
MAX_JSON_BYTES = 64 * 1024 * 1024

_unique = itertools.count()  # two threads of one process writing the same target get distinct temporary files


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the renames inside `directory` durable. Best effort where a directory cannot be opened (Windows) or
    fsynced (some network filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_synced(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Publish the finished file `tmp` as `target`: fsync it, rename it over `target`, fsync the directory. For
    writers that must hold their temporary file open for a while (a tar shard filled item by item); others use
    `atomic_write`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(Path(target).parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` with a temporary path beside `path` (same directory, so the rename is atomic), then publish
    it as `path` (`replace_synced`). If `write` raises, `path` keeps its old content, the temporary file is removed
    and the error propagates. `write` must write the file whole (torch.save, safetensors' save_file, PIL's save --
    give PIL the format: the temporary name ends in `.tmp`). The directory must exist."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_unique)}.tmp")
    try:
        write(tmp)
        replace_synced(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the whole content of `path` (see `atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """`text` as the whole content of `path` (see `atomic_write`)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON with a final newline (see `atomic_write`)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Build a whole directory and swap it in at `path`: `write(fresh)` fills the empty folder `fresh` beside `path`;
    then whatever was at `path` is moved aside and removed, and `fresh` renamed to `path`. Nothing of the old
    directory survives into the new one, and a `write` that raises (or a crash) leaves the old one whole. (Between the
    two renames `path` is briefly absent: POSIX cannot rename a folder over a non-empty one.)"""
    path = Path(path)
    fresh = path.with_name(f".{path.name}.new-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)  # left by an earlier crash of this process id
    fresh.mkdir(parents=True)
    try:
        write(fresh)
        fsync_dir(fresh)
        if path.exists():
            os.replace(path, old)
        os.replace(fresh, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_bytes_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The content of the regular file `path`, refused before reading if larger than `max_bytes`.

    Raises FileNotFoundError when it does not exist, ValueError when it is not a regular file (a FIFO would block the
    read forever, /dev/zero never end it) or is too large; both name the file."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"{path} is {info.st_size} bytes, more than the {max_bytes} this file may have")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # a file that grew since the stat is still bounded
    if len(data) > max_bytes:
        raise ValueError(f"{path} is more than the {max_bytes} bytes this file may have")
    return data


def parse_json(text: str | bytes, source: str) -> Any:
    """`text` parsed as JSON; ValueError "<source> is not valid JSON: <why>" otherwise (also for text nested too
    deeply for the parser and for integers too long to convert)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{source} is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError; over-long integers raise plain ValueError
        raise ValueError(f"{source} is not valid JSON: {e}") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in the file `path` (see `read_bytes_bounded` and `parse_json` for the errors)."""
    return parse_json(read_bytes_bounded(path, max_bytes), str(path))


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in the file `path`: FileNotFoundError "<path> not found", ValueError "<path> is not valid
    JSON: ..." or "<path> must hold a JSON object, got <type>"."""
    data = read_json(path, max_bytes)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
