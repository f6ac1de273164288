"""Atomic files and folders, and JSON / safetensors read and write with one-line errors.

Everything is written to a temporary path beside its target and renamed into place, so a reader (or a run
killed mid-write) sees the old file or the new one, never half of one. Our own files are JSON and
safetensors; torch is imported only by the safetensors helpers, when they are called.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
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
        # mkdtemp makes 0700, and writers such as safetensors' save_file make their files 0600: a serving user
        # other than the owner could not read the result
        for inner in [tmp, *tmp.rglob("*")]:
            if not inner.is_symlink():
                os.chmod(inner, _umask_mode(inner.is_dir()))
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


def check_writable(path: str | Path, knob: str, directory: bool = False) -> None:
    """Refuse in one line, before any work, an output that cannot be written: the folder a file `path` is
    written into (beside it, as atomic_path does), or the folder `path` itself when `directory`."""
    path = Path(path)
    folder = path if directory else path.parent
    try:
        if not directory and path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{knob}: cannot write {path} ({err.strerror or err}); choose a writable path") from None


LOCK_NAME = ".aletheia.lock"


class OutputLock:
    """An exclusive lock on an output directory for as long as a job runs in it.

    flock on an open file: the kernel drops it when the holding process exits, however it exits, so the lock
    file a killed job leaves behind never blocks the next one. The holder's pid, host and start time are
    written into the file for the refusal message only; they are never trusted to decide who holds it.
    """

    def __init__(self, directory: str | Path, knob: str = "train.output_dir"):
        self.directory, self.knob, self.fd = Path(directory), knob, None
        self.created_directory = False

    def acquire(self) -> "OutputLock":
        created = not self.directory.exists()
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                raise ConfigError(
                    f"{self.knob}: {self.directory} is in use by another run ({holder}); wait for it "
                    "to end, or choose another output directory"
                ) from None
            # the holder before us removes the file as it releases it: a lock taken on that removed file is no
            # lock, so take it again on the file now at the path
            try:
                current = os.stat(self.directory / LOCK_NAME).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        self.fd, self.created_directory = fd, created
        return self

    def _open(self) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, _umask_mode(False))
        except OSError as err:
            raise ConfigError(
                f"{self.knob}: cannot write to {self.directory} ({err.strerror or err}); choose a writable directory"
            ) from None

    def release(self) -> None:
        """Remove the lock file while still holding it, then drop the lock: a job leaves no file of its own
        behind (and a refused one leaves the directory as it found it); a waiter that opened the removed file
        notices in `acquire` and takes the lock again on the path's new file."""
        if self.fd is not None:
            (self.directory / LOCK_NAME).unlink(missing_ok=True)
            if self.created_directory:
                with contextlib.suppress(OSError):
                    self.directory.rmdir()  # only when empty: a refused run made it and wrote nothing
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def append_line(fd: int, line: str) -> None:
    """One os.write of the whole line on an O_APPEND descriptor: concurrent writers never interleave inside a
    line, and a kill leaves at most the last line short."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    written = os.write(fd, data)
    if written != len(data):  # a full disk; the rest would land as a separate, torn line
        raise OSError(f"short write ({written} of {len(data)} bytes)")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_manifest(root: Path) -> dict[str, list]:
    """{relative path: [size in bytes, sha256]} of every file under `root`."""
    return {
        str(p.relative_to(root)): [p.stat().st_size, file_digest(p)] for p in sorted(root.rglob("*")) if p.is_file()
    }


def manifest_problem(root: Path, manifest: dict[str, list]) -> str | None:
    """None when every file of `manifest` is under `root` with its size and checksum; else the first that
    is not, in words."""
    for name, (size, digest) in manifest.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if file_digest(path) != digest:
            return f"{name} does not match its checksum"
    return None


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
