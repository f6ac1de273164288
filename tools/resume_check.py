"""python tools/resume_check.py --config launch/configs/tiny_cpu.yaml --gpus 2 [--out runs/resume_check] [key=value ...]

Crash-and-resume check on real hardware: an uninterrupted run, then the same job with one rank SIGKILLed at
a random step after the first checkpoint and resumed with `--resume auto`. Prints both runs' per-step and
held-out losses and the largest adapter difference; exits 1 if they differ by more than --tolerance.
`--gpus 0` runs 2 CPU ranks (DS_ACCELERATOR=cpu), where the two runs agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, start_logged  # first: it puts this checkout on sys.path

from aletheia_ds.launchers.deepspeed import local_command


def launch(args, overrides: list[str], log: Path) -> subprocess.Popen:
    """The job on `--gpus` ranks (2 CPU ranks for 0), its output into `log`."""
    cmd = local_command(str(ROOT / "launch/train.py"), ["--config", args.config, *overrides], args.gpus or 2)
    return start_logged(cmd, log, cpu=args.gpus == 0)


def steps_logged(run_dir: Path) -> list[dict]:
    rows = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return rows


def main() -> int:
    import psutil
    from safetensors.torch import load_file

    from aletheia_ds.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs per run; 0: 2 CPU ranks")
    parser.add_argument("--out", default="runs/resume_check")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill step and rank")
    args, extra = parser.parse_known_args()
    cfg = load_config(["--config", args.config, *extra])
    steps = cfg.train.max_steps
    if not steps or steps < 4:
        raise SystemExit("set train.max_steps >= 4 (in the config or as train.max_steps=N)")
    save_every = cfg.train.save_every or max(1, steps // 4)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    pick = random.Random(seed)
    kill_at, victim = pick.randint(save_every + 1, steps - 1), pick.randint(0, (args.gpus or 2) - 1)
    out = Path(args.out)
    reference, crashed = out / "reference", out / "crashed"
    common = [*extra, f"train.save_every={save_every}"]
    print(f"seed {seed}: kill rank {victim} after step {kill_at} of {steps}; checkpoints every {save_every}")

    out.mkdir(parents=True, exist_ok=True)
    for run_dir in (reference, crashed):
        if (run_dir / "checkpoints").exists():
            raise SystemExit(f"{run_dir} holds an earlier check; remove {out} first")
    if launch(args, [*common, f"train.output_dir={reference}"], out / "reference.log").wait() != 0:
        raise SystemExit(f"reference run failed; see {out / 'reference.log'}")

    launcher = launch(args, [*common, f"train.output_dir={crashed}"], out / "crashed.log")
    while launcher.poll() is None and max((r["step"] for r in steps_logged(crashed)), default=0) < kill_at:
        time.sleep(0.05)
    ranks = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if f"--local_rank={victim}" in " ".join(p.cmdline())
    ]
    if launcher.poll() is not None or not ranks:
        raise SystemExit(f"the run ended before the kill; see {out / 'crashed.log'}")
    os.kill(ranks[0].pid, signal.SIGKILL)
    launcher.wait()
    print(f"killed rank {victim} (pid {ranks[0].pid}); latest: {(crashed / 'checkpoints' / 'latest').read_text()}")
    if launch(args, [*common, f"train.output_dir={crashed}", "--resume", "auto"], out / "resumed.log").wait() != 0:
        raise SystemExit(f"resumed run failed; see {out / 'resumed.log'}")

    ref_rows, rows = steps_logged(reference), steps_logged(crashed)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "metrics.jsonl has missing or repeated steps"
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ref_rows, rows))
    ref_eval, got_eval = (json.loads((d / "eval.json").read_text())["eval_loss_after"] for d in (reference, crashed))
    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    adapter_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"final step loss {ref_rows[-1]['loss']!r} vs {rows[-1]['loss']!r}; max per-step loss diff {loss_diff:.3g}")
    print(f"held-out loss after {ref_eval!r} vs {got_eval!r}; max adapter diff {adapter_diff:.3g}")
    ok = max(loss_diff, abs(ref_eval - got_eval), adapter_diff) <= args.tolerance
    print("SAME within tolerance" if ok else f"DIFFERENT (tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
