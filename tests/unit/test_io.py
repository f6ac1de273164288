"""Output files a cluster shares: modes, the output-directory lock, metrics rows that stay whole, manifests."""

import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from aletheia_ds.config import ConfigError
from aletheia_ds.io import (
    LOCK_NAME,
    OutputLock,
    atomic_dir,
    manifest_problem,
    save_safetensors_atomic,
    tree_manifest,
    write_json_atomic,
)
from aletheia_ds.metrics import JsonlSink


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_umask_mode_not_0600(tmp_path, umask_022):
    import torch

    from aletheia_ds.checkpoint import save_rng

    write_json_atomic(tmp_path / "eval.json", {"a": 1})
    save_safetensors_atomic(tmp_path / "adapter_model.safetensors", {"w": torch.zeros(2)})
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "merged") as tmp:  # as the adapter export and the merge write theirs
        (tmp / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    save_rng(tmp_path / "rng" / "rank-00000.safetensors")
    assert mode(tmp_path / "eval.json") == 0o644
    assert mode(tmp_path / "adapter_model.safetensors") == 0o644
    assert mode(tmp_path / "merged") == 0o755 and mode(tmp_path / "merged" / "config.json") == 0o644
    assert mode(tmp_path / "merged" / "model.safetensors") == 0o644
    assert mode(tmp_path / "rng" / "rank-00000.safetensors") == 0o644


HOLD = """
import sys, time
from aletheia_ds.io import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_held_output_dir_is_refused_in_one_line_and_a_dead_holder_releases_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "60"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(
        ConfigError,
        match=rf"^train.output_dir: {tmp_path} is in use by another run "
        rf"\(pid {holder.pid} on .*, since .*\); wait for it",
    ) as info:
        OutputLock(tmp_path).acquire()
    assert "\n" not in str(info.value)
    holder.kill()  # a crashed job: its lock file stays, its lock does not
    holder.wait()
    assert (tmp_path / LOCK_NAME).is_file()
    with OutputLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()


def test_a_released_lock_leaves_nothing_and_a_waiter_never_holds_a_removed_file(tmp_path):
    fresh = tmp_path / "new_run"
    OutputLock(fresh).acquire().release()  # a run refused right after taking the lock
    assert not fresh.exists()  # the directory it made, empty, is gone with the lock file
    kept = tmp_path / "run"
    kept.mkdir()
    (kept / "metrics.jsonl").write_text("{}\n")
    first = OutputLock(kept).acquire()
    stale = os.open(kept / LOCK_NAME, os.O_RDWR)  # a second job opened the file before the first let go
    first.release()
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.jsonl"]
    second = OutputLock(kept).acquire()  # takes the lock on the file now at the path, not on the removed one
    assert os.fstat(second.fd).st_ino == os.stat(kept / LOCK_NAME).st_ino != os.fstat(stale).st_ino
    with pytest.raises(ConfigError, match="is in use by another run"):
        OutputLock(kept).acquire()
    second.release()
    os.close(stale)


def test_an_unwritable_output_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^train.output_dir: cannot write to .*file"):
        OutputLock(tmp_path / "file").acquire()
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ConfigError, match=r"^train.output_dir: cannot write to .*ro \(Permission denied\)"):
            OutputLock(tmp_path / "ro").acquire()


def test_metrics_rows_stay_whole_with_two_writers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first, second = JsonlSink(path), JsonlSink(path, append=True)
    big = "x" * 100_000  # beyond any stdio buffer: a buffered writer splits such a row into several writes

    def write(sink, name):
        for step in range(50):
            sink.write({"step": step, "who": name, "pad": big})

    threads = [threading.Thread(target=write, args=(s, n)) for s, n in ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close(), second.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["who"], r["step"]) for r in rows) == sorted((w, s) for w in "ab" for s in range(50))


def test_manifest_names_the_damaged_file(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "optim.pt").write_bytes(b"0123456789")
    (tmp_path / "rng.safetensors").write_bytes(b"abc")
    manifest = tree_manifest(tmp_path)
    assert manifest_problem(tmp_path, manifest) is None
    (tmp_path / "rng.safetensors").write_bytes(b"abd")
    assert manifest_problem(tmp_path, manifest) == "rng.safetensors does not match its checksum"
    (tmp_path / "ds" / "optim.pt").write_bytes(b"01234")
    assert manifest_problem(tmp_path, manifest) == "ds/optim.pt has 5 bytes, 10 were written"
    (tmp_path / "ds" / "optim.pt").unlink()
    assert manifest_problem(tmp_path, manifest) == "ds/optim.pt is missing"
