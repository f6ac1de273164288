"""Stage restore: a cache rebuilt from a published study (--out: results.json and runs.json), so that the speed
and report stages run again without the bases, e.g. on a fresh GPU machine whose /tmp lost the cache:

    python -m tools.quality --stage restore --cache /tmp/quality_cache --out docs/quality
    python -m tools.quality --stage speed --cache /tmp/quality_cache

Restored: every run record (arms.record_path), and per base what the report reads of its prepared plans file
(probe layer scores, step times alone on the device, base evaluation, pretraining, notes) and the speed results.
Not restored: the bases' weights, tokenizer and task data, so the pretrain and arms stages cannot resume from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from aletheia_ds.io import write_json_atomic
from tools.quality.settings import Settings


def stage_restore(s: Settings, key: str, log) -> int:
    out, cache = Path(s.out), Path(s.cache)
    results_path, runs_path = out / "results.json", out / "runs.json"
    for path in (results_path, runs_path):
        if not path.is_file():
            raise SystemExit(f"restore: {path} not found; --out must name a folder written by --stage report")
    results = json.loads(results_path.read_text())
    if results.get("study_key") != key:
        raise SystemExit(
            f"restore: {results_path} is study {results.get('study_key')!r}, these settings make {key!r}; "
            f"pass the settings it records under 'settings' (e.g. --tasks {results['settings'].get('tasks')})"
        )
    from tools.quality.arms import record_path

    runs = json.loads(runs_path.read_text())
    for record in runs:
        write_json_atomic(record_path(cache, key, record["base"], record["arm"], record["seed"], record["lr"]), record)
    for base, block in results["bases"].items():
        write_json_atomic(
            cache / "bases" / base / f"plans-{key}.json",
            {
                "probe": {"layers": [{"score": score} for score in block["probe_layer_scores"]]},
                "step_seconds_alone": block["step_seconds_alone"],
                "base_eval": block["base_eval"],
                "pretrain": block["pretrain"],
                "notes": block.get("notes", []),
                "restored_from": str(results_path),
            },
        )
    if results.get("corpus"):
        write_json_atomic(cache / "corpus.json", results["corpus"])
    if results.get("speed"):
        write_json_atomic(cache / f"speed-{key}.json", results["speed"])
    log(f"restore: {len(runs)} runs and {len(results['bases'])} bases from {out} into {cache}")
    return len(runs)
