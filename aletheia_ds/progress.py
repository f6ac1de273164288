"""Progress of the probe and of training on rank 0: a tqdm bar (tokens/s, loss, ETA) on a terminal; plain
lines, about ten per phase, in logs, under `train.quiet=true` / `--quiet`, or when stderr is not a terminal.

    progress = Progress("train", total=steps, enabled=ctx.is_main, quiet=cfg.train.quiet)
    progress.update(step, tokens=4096, loss=2.31, lr=1e-4)
    progress.close()
"""

from __future__ import annotations

import sys
import time
from typing import Optional


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60:02d}:{seconds % 60:02d}"
    )


class Progress:
    def __init__(self, desc: str, total: int, enabled: bool, quiet: bool = False, unit: str = "step", start: int = 0):
        from tqdm import tqdm

        self.desc, self.total, self.unit = desc, total, unit
        self.lines = enabled and (quiet or not sys.stderr.isatty())
        self.bar = tqdm(
            total=total, initial=start, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled or self.lines
        )
        self.every = max(1, total // 10)
        self.started = time.perf_counter()
        self.tokens = 0
        self.start = self.done = start  # a resumed run starts part way: the ETA counts this run's pace only

    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, tokens: int = 0, loss: Optional[float] = None, **extra: float) -> None:
        """`done` of `total` finished; `tokens` processed since the last update (real, non-pad tokens)."""
        self.done = done
        self.tokens += tokens
        postfix = {"tok/s": f"{self.tokens_per_s():,.0f}"}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if not self.bar.disable:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.n = done
            self.bar.refresh()
        if self.lines and (done % self.every == 0 or done == self.total):
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (done - self.start) * (self.total - done) if done > self.start else 0.0
            values = "".join(f"  {k} {v:.2e}" if k == "lr" else f"  {k} {v:.4g}" for k, v in extra.items())
            loss_text = f"  loss {loss:.4f}" if loss is not None else ""
            print(
                f"{self.desc} {done}/{self.total}{loss_text}{values}  tokens/s {self.tokens_per_s():,.0f}  "
                f"elapsed {_clock(elapsed)}  eta {_clock(eta)}",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()
