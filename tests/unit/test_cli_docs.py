"""The config reference cannot drift from the config dataclasses; every subcommand's --help has a worked example;
`aletheia-ds train` builds the DeepSpeed launcher command. (The CLI's one-line errors, run as a process, are in
tests/distributed/test_cli_errors.py.)"""

import pytest
from helpers.ranks import ROOT

from aletheia_ds.cli import EXAMPLES, build_parser, main
from aletheia_ds.config import RunConfig, config_reference_markdown


def test_committed_config_reference_equals_the_generated_one():
    committed = (ROOT / "docs/CONFIG.md").read_text(encoding="utf-8")
    assert committed == config_reference_markdown(), (
        "docs/CONFIG.md is stale: run `aletheia-ds defaults --markdown > docs/CONFIG.md`"
    )


def test_config_reference_lists_every_key_with_its_default():
    text = config_reference_markdown()
    for section, field in RunConfig.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"| `{section}.{name}` |" in text
    assert "| `plan.top_pct` | float | `50.0` | percent of layers kept by score (rule top_pct) |" in text
    assert "| `train.report_to` | list[tensorboard \\| wandb \\| mlflow] | `[]` |" in text


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_help_has_a_worked_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"aletheia-ds {command}" in out


def test_train_prints_the_deepspeed_command(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    config = ROOT / "launch/configs/tiny_cpu.yaml"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--num-gpus",
                "2",
                "--master-port",
                "29999",
                "--dry-run",
                "--quiet",
                "plan.top_pct=25",
                "--train.lr",
                "1e-3",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "deepspeed" in line and "--num_gpus 2 --master_port 29999" in line
    assert line.endswith(f"launch/train.py --config {config} plan.top_pct=25 --train.lr 1e-3 train.quiet=true")
    assert main(["train", "--config", str(config), "--hostfile", str(hostfile), "--dry-run"]) == 0
    assert f"--hostfile {hostfile}" in capsys.readouterr().out


@pytest.mark.parametrize("command,flag", [("train", "--resume"), ("report", "--run")])
def test_help_lists_every_flag_the_command_takes(command, flag, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert flag in capsys.readouterr().out
