"""Peak host memory of this process, split the way Linux accounts for it.

ru_maxrss (`dist.peak_host_rss_gib`) counts every resident page, and memory-mapped files are resident pages:
a rank that maps a 60 GB safetensors checkpoint and copies it into GPU partitions shows 60 GB there while
holding next to nothing itself. /proc/self/status splits the two:
  RssAnon  anonymous pages: heap, CPU tensors, copies; what the process really holds
  RssFile  file-backed pages: mapped files (safetensors shards, shared libraries); the kernel can drop them
           and read them again, but they count against the process while mapped
A background thread samples both (every 20 ms by default) for the length of a `with HostMemoryPeaks()`
block; a spike shorter than the interval can be missed, which ru_maxrss, recorded beside it, does not.
(psutil folds shared memory into its "shared" figure and is not a dependency; the file is three lines.)
"""

from __future__ import annotations

import threading
from typing import Optional

STATUS_FIELDS = {"RssAnon": "anon", "RssFile": "file", "VmRSS": "rss"}


def host_memory_gib() -> dict[str, float]:
    """This process's resident memory now, in GiB: {"anon", "file", "rss"}; empty where /proc is absent."""
    found = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    found[STATUS_FIELDS[key]] = int(value.split()[0]) / 2**20  # kB
    except OSError:
        return {}
    return found


class HostMemoryPeaks:
    """`with HostMemoryPeaks() as host: ...` then `host.summary("anon")` (also "file", "rss"), in GiB."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.before_gib: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> None:
        for key, gib in host_memory_gib().items():
            self.peak_gib[key] = max(self.peak_gib.get(key, 0.0), gib)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "HostMemoryPeaks":
        self.before_gib = host_memory_gib()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="host-memory-peaks", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self, key: str) -> dict[str, Optional[float]]:
        """{"before": at the start, "peak": the highest sample} of one field ("anon", "file", "rss") in GiB
        to the MiB; None where /proc could not be read."""
        return {
            "before": round(self.before_gib[key], 3) if key in self.before_gib else None,
            "peak": round(self.peak_gib[key], 3) if key in self.peak_gib else None,
        }
