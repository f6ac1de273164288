"""The Ray driver's checks without a cluster: does a job fit the nodes, which paths it rewrites."""

from pathlib import Path

import pytest

from aletheia_ds.config import ConfigError, load_config
from aletheia_ds.launchers.ray import for_ray, missing_resources


def test_missing_resources_names_what_is_short():
    two_nodes = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}]
    assert missing_resources({"GPU": 1.0}, 8, two_nodes) is None
    assert missing_resources({"GPU": 1.0}, 9, two_nodes) == "GPU: 9 workers x 1 = 9 needed, the cluster has 8"
    assert missing_resources({"CPU": 1.0}, 3, [{"CPU": 2.0}]) == "CPU: 3 workers x 1 = 3 needed, the cluster has 2"
    assert missing_resources({"GPU": 0.5}, 4, [{"GPU": 1.0}, {"GPU": 1.0}]) is None
    # enough in all, but a worker's bundle must lie on one node
    assert (
        missing_resources({"CPU": 6.0, "GPU": 1.0}, 2, [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 0.0}])
        == "only 0 of 2 workers fit: each needs {'CPU': 6.0, 'GPU': 1.0} on one node, the nodes offer "
        "{CPU: 4, GPU: 2}, {CPU: 8, GPU: 0}"
    )
    assert missing_resources({"TPU": 1.0}, 1, []) == "TPU: 1 workers x 1 = 1 needed, the cluster has 0"
    # STRICT_SPREAD: one worker per node, however much one node could hold
    assert missing_resources({"GPU": 1.0}, 2, two_nodes, one_per_node=True) is None
    assert (
        missing_resources({"GPU": 1.0}, 3, two_nodes, one_per_node=True)
        == "STRICT_SPREAD puts each worker on a node of its own and only 2 of the 2 nodes can hold one of {'GPU': 1.0}"
    )


def test_for_ray_makes_paths_absolute_and_puts_outputs_in_storage(tmp_path):
    cfg = load_config(
        [
            "model.path=models/m",
            "data.train=/abs/train.jsonl",
            "train.output_dir=runs/exp7",
            f"ray.storage_path={tmp_path}/store",
        ]
    )
    ray_cfg = for_ray(cfg, Path("/jobs/here"))
    assert ray_cfg.model.path == "/jobs/here/models/m" and ray_cfg.data.train == "/abs/train.jsonl"
    mixed = for_ray(
        load_config(["data.train=[{path: a.jsonl, weight: 0.7}, {path: /abs/b.parquet, weight: 0.3}]"]),
        Path("/jobs/here"),
    )
    assert [(s.path, s.weight) for s in mixed.data.train] == [("/jobs/here/a.jsonl", 0.7), ("/abs/b.parquet", 0.3)]
    assert ray_cfg.deepspeed.config == "/jobs/here/ds_configs/zero3.json"
    assert ray_cfg.ray.name == "exp7" and ray_cfg.train.output_dir == f"{tmp_path}/store/exp7"
    named = for_ray(load_config(["ray.name=other", f"ray.storage_path={tmp_path}"]), Path("/x"))
    assert named.train.output_dir == f"{tmp_path}/other"
    assert for_ray(load_config([]), Path("/x")).ray.storage_path == str(Path("~/ray_results").expanduser())


def test_relative_storage_inside_rays_copy_of_the_working_dir_is_refused():
    cfg = load_config(["ray.storage_path=runs"])
    with pytest.raises(ConfigError, match=r"ray.storage_path: 'runs' is relative and this job runs in Ray's temporary"):
        for_ray(cfg, Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"))
    assert for_ray(cfg, Path("/home/me/proj")).train.output_dir == "/home/me/proj/runs/default"


@pytest.mark.parametrize(
    "override,match",
    [
        ("ray.num_workers=0", r"ray.num_workers: must be >= 1, got 0"),
        ("ray.storage_path=s3://bucket/runs", r"ray.storage_path: must be a file system path that every node sees"),
        ("ray.resources_per_worker={GPU: 1}", r"ray.resources_per_worker: GPU is 1 while ray.use_gpu is false"),
        ("ray.max_failures=-3", r"ray.max_failures: must be >= 0, or -1 for no limit, got -3"),
        ("ray.name=a/b", r"ray.name: must be one directory name"),
        ("ray.num_worker=2", r"unknown config key 'ray.num_worker'; did you mean 'ray.num_workers'"),
    ],
)
def test_ray_section_errors_name_the_knob(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config([override])
    assert "\n" not in str(info.value)


def test_the_readmes_ray_command_runs_on_what_a_fresh_clone_holds(tmp_path):
    """`--working-dir .` uploads what git tracks, and a fresh clone has no generated weights: the README's tiny
    Ray job must find every file it names there and build its model without them."""
    import contextlib
    import shutil
    import subprocess

    import torch
    from helpers.ranks import ROOT

    from aletheia_ds.model import has_weights, load_model

    command = "python launch/ray_train.py --config launch/configs/tiny_ray.yaml"
    assert command in (ROOT / "README.md").read_text()
    tracked = subprocess.run(
        ["git", "ls-files", "launch", "examples", "ds_configs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    cfg = for_ray(load_config(["--config", str(tmp_path / "launch/configs/tiny_ray.yaml")]), tmp_path)
    cfg.require_paths()  # what the driver checks before any worker starts
    assert not has_weights(cfg.model.path)
    model = load_model(cfg.model, torch.float32, torch.device("cpu"), contextlib.nullcontext)  # what a worker builds
    assert sum(p.numel() for p in model.parameters()) > 0


def test_shipped_72b_ray_job_is_the_2_gpu_random_init_shape(root):
    """launch/configs/qwen2_72b_ray.yaml, as tools/ray_gpu.sh submits it: 2 GPU workers, 20 steps, the 72B shape of
    tools/_common.SHAPES with random weights, every path inside the uploaded working directory."""
    import json

    from _common import model_config

    cfg = for_ray(load_config(["--config", str(root / "launch/configs/qwen2_72b_ray.yaml")]), root)
    cfg.require_paths()
    assert (cfg.ray.num_workers, cfg.ray.use_gpu, cfg.train.max_steps, cfg.model.random_init) == (2, True, 20, True)
    shipped = json.loads((Path(cfg.model.path) / "config.json").read_text())
    want = model_config("qwen2-72b").to_dict()
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        assert shipped[key] == want[key], key
    assert (shipped["num_key_value_heads"], shipped["vocab_size"]) == (want["num_key_value_heads"], want["vocab_size"])
