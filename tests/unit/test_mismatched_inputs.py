"""Inputs that belong to another model or cannot be written, refused in one line before anything heavy runs."""

import pytest
from helpers.ranks import ROOT, save_tiny_llama

from aletheia_ds.cli import build_parser
from aletheia_ds.config import ConfigError, ModelSection
from aletheia_ds.data import load_tokenizer
from aletheia_ds.model import check_vocabulary

TOKENIZER = str(ROOT / "examples/tiny/tokenizer")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model = save_tiny_llama(tmp_path / "small_vocab", vocab_size=256)
    with pytest.raises(ConfigError, match=r"^model.tokenizer: .*tokenizer has 512 tokens, the model .* embeds 256"):
        check_vocabulary(ModelSection(path=str(model), tokenizer=TOKENIZER), load_tokenizer(TOKENIZER))


def test_another_models_tokenizer_is_refused_by_its_end_of_sequence_id(tmp_path):
    model = save_tiny_llama(tmp_path / "other_eos", eos_token_id=7)
    with pytest.raises(ConfigError, match=r"ends sequences with id 2, the model .* with \[7\]"):
        check_vocabulary(ModelSection(path=str(model), tokenizer=TOKENIZER), load_tokenizer(TOKENIZER))
    same = save_tiny_llama(tmp_path / "same")
    check_vocabulary(ModelSection(path=str(same), tokenizer=TOKENIZER), load_tokenizer(TOKENIZER))


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_take_trust_remote_code(command):
    args, _ = build_parser().parse_known_args(
        [command, "--model", "m", "--adapter", "a", "--data", "d", "--out", "o", "--trust-remote-code"]
    )
    assert args.trust_remote_code is True
    args, _ = build_parser().parse_known_args([command, "--model", "m", "--adapter", "a", "--data", "d", "--out", "o"])
    assert args.trust_remote_code is False


def _probe_of(model_dir, **report_fields):
    """A probe report of the saved model at `model_dir` (scores made up), as `aletheia-ds probe` records it."""
    from helpers.reports import fake_report
    from transformers import AutoModelForCausalLM

    from aletheia_ds.arch import describe
    from aletheia_ds.model import fingerprint, fingerprint_digest

    layout = describe(AutoModelForCausalLM.from_pretrained(str(model_dir)))
    report = fake_report(layout, [1.0, 2.0, 3.0, 4.0])
    report.model_fingerprint = fingerprint_digest(fingerprint(ModelSection(path=str(model_dir))))
    for key, value in report_fields.items():
        setattr(report, key, value)
    return report, layout


def test_a_probe_of_another_model_with_the_same_layer_count_is_refused(tmp_path):
    from aletheia_ds.model import fingerprint, fingerprint_digest

    model = save_tiny_llama(tmp_path / "model")
    wider = save_tiny_llama(tmp_path / "wider", hidden_size=64, num_attention_heads=4)
    report, layout = _probe_of(model)
    digest = fingerprint_digest(fingerprint(ModelSection(path=str(model))))
    assert report.check_fits(layout.to_json(), layout.num_layers, digest, "probe.report: p") is report
    other, other_layout = _probe_of(wider)
    with pytest.raises(
        ConfigError,
        match=r"^probe.report: p was made on another model \(down_proj in x out features: "
        r"\[64, 64\] in the report, \[64, 32\] in this model\)",
    ):
        other.check_fits(layout.to_json(), layout.num_layers, digest, "probe.report: p")
    # same architecture, other weights (another seed, its files the same size): the config-and-sizes fingerprint
    # cannot tell; another config (here the vocabulary) can
    bigger_vocab = save_tiny_llama(tmp_path / "vocab", vocab_size=1024)
    with pytest.raises(ConfigError, match=r"fingerprint of config.json and weight file sizes"):
        report.check_fits(
            layout.to_json(),
            layout.num_layers,
            fingerprint_digest(fingerprint(ModelSection(path=str(bigger_vocab)))),
            "probe.report: p",
        )


def test_a_probe_with_other_module_names_is_one_line_not_a_key_error(tmp_path):
    import json

    from aletheia_ds.probe.report import ProbeReport

    report, layout = _probe_of(save_tiny_llama(tmp_path / "model"))
    neox, _ = _probe_of(save_tiny_llama(tmp_path / "neox", family="gpt_neox", intermediate_size=64))
    with pytest.raises(ConfigError, match=r"^probe.report: p was made on another model \(layers at: gpt_neox.layers"):
        neox.check_fits(layout.to_json(), layout.num_layers, "", "probe.report: p")
    # a layer scoring a module the layout does not describe (hand-edited): one line when read, not a KeyError in plan
    blob = report.to_json()
    blob["layers"][0]["modules"]["qkv_proj"] = 1.0
    (tmp_path / "probe.json").write_text(json.dumps(blob))
    with pytest.raises(ConfigError, match=r"probe.json: layers score modules \['qkv_proj'\] that layout"):
        ProbeReport.load(tmp_path / "probe.json")


def test_a_plan_that_does_not_fit_the_model_is_one_line(tmp_path):
    from aletheia_ds.config import PlanSection
    from aletheia_ds.plan import make_plan

    report, layout = _probe_of(save_tiny_llama(tmp_path / "model"))
    plan = make_plan(report, PlanSection(top_pct=50))
    assert plan.check_fits(layout, "plan.plan: p") is plan
    plan.layers_path = "model.decoder.layers"  # hand-edited
    with pytest.raises(ConfigError, match=r"^plan.plan: p: layers_path 'model.decoder.layers' is not where"):
        plan.check_fits(layout, "plan.plan: p")


def test_train_refuses_a_foreign_plan_or_probe_before_probing(tmp_path):
    """Through train's main on one process: the plan and the report are refused before the probe, and the
    refused run leaves no probe.json, probe.png or plan.json in output_dir."""
    import json

    from helpers.ranks import tiny_run_config

    from aletheia_ds.config import PlanSection, RunConfig
    from aletheia_ds.plan import make_plan
    from aletheia_ds.train import main

    model = save_tiny_llama(tmp_path / "model")
    report, _ = _probe_of(model)
    plan_blob = make_plan(report, PlanSection(top_pct=50)).to_json()
    plan_blob["layers_path"] = "model.decoder.layers"
    (tmp_path / "plan.json").write_text(json.dumps(plan_blob))
    wider, _ = _probe_of(save_tiny_llama(tmp_path / "wider", hidden_size=64))
    (tmp_path / "probe.json").write_text(json.dumps(wider.to_json()))
    for knob, given, message in (
        ("plan.plan", tmp_path / "plan.json", "layers_path 'model.decoder.layers'"),
        ("probe.report", tmp_path / "probe.json", "was made on another model"),
    ):
        out = tmp_path / f"run-{knob}"
        config = tiny_run_config(model, out, deepspeed={"config": str(ROOT / "ds_configs/zero2.json")})
        section, key = knob.split(".")
        config[section][key] = str(given)
        with pytest.raises(ConfigError, match=rf"^{knob}: .*{message}"):
            main(RunConfig.model_validate(config))
        assert not out.exists()  # the refused run made the directory for its lock and leaves nothing


@pytest.fixture
def probe_json(tmp_path):
    import json

    report, _ = _probe_of(save_tiny_llama(tmp_path / "model"))
    (tmp_path / "probe.json").write_text(json.dumps(report.to_json()))
    return tmp_path / "probe.json"


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_plan_checks_the_probe_against_a_given_model_and_says_when_it_cannot(tmp_path, probe_json, capsys):
    from aletheia_ds.cli import main

    wider = save_tiny_llama(tmp_path / "wider", hidden_size=64)
    capsys.readouterr()
    assert main(["plan", "--probe", str(probe_json), "--out", str(tmp_path / "plan.json"), f"model.path={wider}"]) == 2
    assert "was made on another model (fingerprint" in _one_error_line(capsys)
    assert main(["plan", "--probe", str(probe_json), "--out", str(tmp_path / "plan.json")]) == 0
    assert "no model.path given: probe.json not checked against a model" in capsys.readouterr().out
    assert (
        main(
            [
                "plan",
                "--probe",
                str(probe_json),
                "--out",
                str(tmp_path / "plan.json"),
                f"model.path={tmp_path / 'model'}",
            ]
        )
        == 0
    )
    assert "checked against" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["plan", "report", "eval", "export"])
def test_an_unwritable_out_is_one_line_before_any_work(command, tmp_path, probe_json, capsys):
    from aletheia_ds.cli import main

    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"  # inside a file: never writable, whoever runs it
    model = str(tmp_path / "model")
    argv = {
        "plan": ["plan", "--probe", str(probe_json)],
        "report": ["report", str(tmp_path)],
        "eval": ["eval", "--model", model, "--data", str(ROOT / "examples/tiny/eval.jsonl"), "--tokenizer", TOKENIZER],
        "export": ["export", "--model", model, "--adapter", model, "--merge"],
    }[command]
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    assert f"{command} --out: cannot write" in _one_error_line(capsys)


def test_a_truncated_single_file_checkpoint_is_one_line_naming_the_file(tmp_path):
    from aletheia_ds.evaluate import evaluate_adapter
    from aletheia_ds.merge import export_merged

    model = save_tiny_llama(tmp_path / "model")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(ConfigError, match=rf"^--model: {weights} is truncated"):
        evaluate_adapter(
            model=str(model), adapter=None, data=str(ROOT / "examples/tiny/eval.jsonl"), tokenizer=TOKENIZER
        )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"^--model: {weights} is truncated"):
        export_merged(str(model), str(adapter), str(tmp_path / "merged"))


def test_an_adapter_of_another_model_is_one_line_naming_it(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from aletheia_ds.evaluate import evaluate_adapter
    from aletheia_ds.merge import export_merged

    model = save_tiny_llama(tmp_path / "model")
    wider = AutoModelForCausalLM.from_pretrained(str(save_tiny_llama(tmp_path / "wider", hidden_size=64)))
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    get_peft_model(wider, LoraConfig(r=4, target_modules=["q_proj", "down_proj"])).save_pretrained(str(adapter))
    message = rf"^--adapter: {adapter} was trained on another model: 12 LoRA tensors do not fit \(first: "
    with pytest.raises(ConfigError, match=message):
        evaluate_adapter(
            model=str(model),
            adapter=str(adapter),
            data=str(ROOT / "examples/tiny/eval.jsonl"),
            tokenizer=TOKENIZER,
            batches=1,
            batch_size=2,
            seq_len=32,
        )
    with pytest.raises(ConfigError, match=message):
        export_merged(str(model), str(adapter), str(tmp_path / "merged"))


def test_the_plan_line_predicts_no_speedup_without_frozen_layers_and_labels_a_cpu_run(tmp_path):
    from aletheia_ds.config import PlanSection
    from aletheia_ds.cost import CostModel
    from aletheia_ds.plan import make_plan
    from aletheia_ds.train import predicted_speed_text

    report, _ = _probe_of(save_tiny_llama(tmp_path / "model"))  # layer scores rise with depth
    everything = make_plan(report, PlanSection(rule="all", attention_r=4, mlp_r=4), CostModel.analytic(report))
    assert "freezes no layer, so no speedup" in predicted_speed_text(everything, "cpu")
    upper = make_plan(report, PlanSection(top_pct=50), CostModel.analytic(report))
    assert upper.lowest_adapted_layer == 2
    assert "for a GPU, not this CPU" in predicted_speed_text(upper, "cpu")
    assert "not this CPU" not in predicted_speed_text(upper, "cuda")
