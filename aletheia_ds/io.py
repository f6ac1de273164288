"""Atomic files and folders, and JSON / safetensors read and write with one-line errors.

Everything is written to a temporary path beside its target and renamed into place, so a reader (or a run
killed mid-write) sees the old file or the new one, never half of one. Our own files are JSON and
safetensors; torch is imported only by the safetensors helpers, when they are called.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .config import ConfigError


def _umask_mode(directory: bool) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; once the block ends it is fsynced, given the usual
    permissions and renamed onto `path`. On an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode(False))  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; once the block ends it gets the usual permissions and
    replaces `path` (an existing one is swapped out, then removed). On an error it is removed and `path` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(True))  # mkdtemp makes 0700
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, blob: Any) -> None:
    write_text_atomic(path, json.dumps(blob, indent=2) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; an existing one is swapped out, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root: Path, recursive: bool = True) -> None:
    """Flush the files and directories under `root` (and `root`) to disk, so that a rename that follows
    cannot reach the disk before what it names."""
    for path in (sorted(root.rglob("*"), reverse=True) if recursive else []) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON file whose top level is an object (probe.json, plan.json, cost.json), or one clear error."""
    try:
        blob = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read {what} ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(blob, dict):
        raise ConfigError(f"{path}: not a {what} (top level is {type(blob).__name__})")
    return blob


def save_safetensors_atomic(path: str | Path, tensors: dict[str, Any]) -> None:
    """`tensors` (name: torch.Tensor) as one safetensors file, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def load_safetensors(path: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))
