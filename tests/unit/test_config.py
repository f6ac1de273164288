"""Config loading: YAML + overrides, one-line errors naming the knob, closest-key suggestions."""

import pytest

from aletheia_ds.config import ConfigError, defaults_yaml, load_config


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: m\ntrain:\n  lr: 0.001\n")
    cfg = load_config(
        [
            "--config",
            str(f),
            "train.lr=5e-4",
            "--plan.top_pct",
            "25",
            "--local_rank=1",
            "--resume",
            "auto",
            "deepspeed.overrides.zero_optimization.stage=2",
        ]
    )
    assert cfg.model.path == "m" and cfg.train.lr == 5e-4 and cfg.plan.top_pct == 25
    assert cfg.train.resume == "auto"
    assert cfg.deepspeed.overrides == {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    "args,text,match",
    [
        ([], "trian:\n  lr: 1\n", r"unknown config section 'trian'; did you mean section 'train'\? \(sections: model,"),
        ([], "train:\n  lrr: 1\n", r"train.lrr.*did you mean 'train.lr'"),
        (["train.lrr=1"], "", r"unknown config key 'train.lrr'; did you mean 'train.lr'"),
        (["plan.top_pct=0"], "", r"plan.top_pct: must be in \(0, 100\], got 0"),
        (["plan.mlp_r=-2"], "", r"plan.mlp_r: rank must be > 0"),
        (["train.micro_batch_size=abc"], "", r"train.micro_batch_size: Input should be a valid integer"),
        ([], "model: [1, 2]\n", r"section 'model' must be a mapping"),
        ([], "- a\n- b\n", r"the top level must be a mapping"),
        ([], "model:\n  path: [unclosed\n", r"c.yaml: line \d+"),
        (["train.lr=1"], "just text\n", r"c.yaml: the top level must be a mapping"),
        ([], "train:\n  seed: 1" + "0" * 5000 + "\n", r"c.yaml: Exceeds the limit \(4300 digits\)"),
        (["train.lr=.inf"], "", r"train.lr: must be a finite number > 0, got inf"),
        (["train.epochs=0"], "", r"train.epochs: must be a finite number > 0, got 0"),
        (["data.max_examples=-5"], "", r"data.max_examples: must be >= 1 \(or unset for all rows\), got -5"),
        (["train.seed=-1"], "", r"train.seed: must be in \[0, 2\*\*32\)"),
        (["train.resume="], "", r"train.resume: must be 'auto' or a checkpoint path"),
        (["deepspeed.overrides.a=1", "deepspeed.overrides.a.b=2"], "", r"'a' already holds a value, not a mapping"),
    ],
)
def test_errors_are_one_line_naming_the_knob(tmp_path, args, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(["--config", str(f), *args])
    assert "\n" not in str(info.value)


def test_a_bad_command_line_value_is_blamed_on_the_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"^command line: plan.top_pct: must be in \(0, 100\], got 0"):
        load_config(["--config", str(f), "plan.top_pct=0"])
    f.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{f}: train.lr: must be"):
        load_config(["--config", str(f), "plan.top_pct=10"])


def test_a_missing_deepspeed_config_lists_every_shipped_one(tmp_path):
    from helpers.ranks import ROOT

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = load_config(
        [
            f"model.path={tmp_path / 'm'}",
            f"data.train={ROOT / 'examples/tiny/train.jsonl'}",
            "deepspeed.config=nope.json",
        ]
    )
    with pytest.raises(ConfigError) as info:
        cfg.require_paths()
    for shipped in (ROOT / "ds_configs").glob("*.json"):
        assert shipped.name in str(info.value)


def test_defaults_document_every_section():
    text = defaults_yaml()
    for section in ("model:", "data:", "probe:", "plan:", "lora:", "train:", "deepspeed:"):
        assert section in text
    assert "top_pct: 50.0  # percent of layers kept by score" in text
