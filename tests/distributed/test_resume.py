"""Crash safety under real DeepSpeed, 2 CPU ranks, ZeRO-3: the reference is one uninterrupted run.

- a rank SIGKILLed at a random step after the first checkpoint, resumed with `--resume auto`, ends with
  the same per-step losses, final held-out loss and adapter tensors, bit for bit;
- a rank killed while a checkpoint is being written (a random point of the write) leaves the previous
  checkpoint usable, and resuming from it again reproduces the reference;
- a second job into a running job's output_dir is refused in one line (the first ends intact); SIGTERM to
  one rank makes every rank finish its step, write a checkpoint together and exit 75; Ctrl-C is one line;
  both resume exactly;
- a damaged newest checkpoint (a truncated shard or RNG file) is skipped for the newest intact one, which
  again reproduces the reference; no intact one is one line;
- a resume with a changed config, plan, model, data or world size is refused with one line naming it.

The random choices print their seed; RELIABILITY_SEED=N reproduces a run.
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import time

import psutil
import pytest
import torch
from helpers.ranks import ROOT, read_jsonl, run_train, save_tiny_llama, tiny_run_config, train_cmd

from aletheia_ds.checkpoint import Checkpoint, find_resume, resolve_checkpoint
from aletheia_ds.config import ConfigError, load_config, validate_tree
from aletheia_ds.dist import DistContext, build_ds_config
from aletheia_ds.launchers.deepspeed import rank_env
from aletheia_ds.plan import Plan

pytestmark = pytest.mark.distributed

STEPS, SAVE_EVERY = 6, 2


def seeded_random(name: str) -> random.Random:
    seed = int(os.environ.get("RELIABILITY_SEED", random.randrange(2**31)))
    print(f"{name}: RELIABILITY_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    save_tiny_llama(tmp / "model")
    return tmp


def job(workdir, name: str) -> dict:
    # lora.dropout > 0: a resumed run that did not restore the RNG state would draw other dropout masks
    return tiny_run_config(
        workdir / "model",
        workdir / name,
        lora={"dropout": 0.1},
        train={"max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": 2},
    )


@pytest.fixture(scope="module")
def reference(workdir):
    run_train(job(workdir, "reference"), workdir)
    return workdir / "reference"


def adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_as_reference(run_dir, reference, checkpoints_pruned=True):
    rows, ref_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once: no reset, no duplicate
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bitwise (JSON floats round-trip)
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]
    got, want = json.loads((run_dir / "eval.json").read_text()), json.loads((reference / "eval.json").read_text())
    assert got["eval_loss_after"] == want["eval_loss_after"] and got["eval_loss_before"] == want["eval_loss_before"]
    tensors, ref_tensors = adapter_tensors(run_dir), adapter_tensors(reference)
    assert tensors.keys() == ref_tensors.keys() and tensors
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    if checkpoints_pruned:
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert checkpoints == ["latest", "step-00000004", "step-00000006"]  # keep_last=2, no temporary left


def latest_step(run_dir) -> int:
    return Checkpoint.read(resolve_checkpoint("auto", run_dir)).step


def logged_steps(run_dir) -> int:
    """The last step in metrics.jsonl while it is being written (a torn last line is ignored)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=0)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={rank}" in child.cmdline():
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank} under the launcher")


def test_rank_killed_at_a_random_step_resumes_exactly(workdir, reference):
    pick = seeded_random("kill")
    kill_at = pick.randint(SAVE_EVERY + 1, STEPS - 1)  # a step after the first checkpoint, before the last
    victim = pick.randint(0, 1)
    out = workdir / "killed"
    cfg = job(workdir, "killed")
    log = (workdir / "killed.log").open("w")
    launcher = subprocess.Popen(
        train_cmd(cfg, workdir), cwd=ROOT, env=rank_env(cpu=True), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None and logged_steps(out) < kill_at:
        time.sleep(0.05)
    assert launcher.poll() is None, (workdir / "killed.log").read_text()[-3000:]
    os.kill(rank_pid(launcher, victim), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    print(f"killed rank {victim} after step {kill_at}; latest checkpoint: step {latest_step(out)}")
    assert not (out / "eval.json").exists()  # the run did not finish
    assert SAVE_EVERY <= latest_step(out) < STEPS

    proc = run_train(cfg, workdir, extra=["--resume", "auto"])
    assert f"resume: {out / 'checkpoints'}" in proc.stdout
    assert "probe:" not in proc.stdout  # neither probed nor planned again
    assert_same_as_reference(out, reference)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(workdir, reference):
    point = seeded_random("crash point").choice(["shard", "rng", "latest"])
    out = workdir / f"crash-{point}"
    cfg = job(workdir, out.name)
    crash_step = 2 * SAVE_EVERY
    proc = run_train(
        cfg,
        workdir,
        script="tests/workers/crash_in_checkpoint.py",
        check=False,
        env=rank_env(cpu=True, CRASH_STEP=str(crash_step), CRASH_POINT=point, CRASH_RANK="1"),
    )
    assert proc.returncode != 0 and "SIGKILLs itself" in proc.stdout, proc.stdout[-3000:]
    root = out / "checkpoints"
    assert latest_step(out) == SAVE_EVERY  # `latest` still names the previous, complete checkpoint
    if point == "latest":
        assert (root / f"step-{crash_step:08d}" / "state.json").is_file()  # renamed, not yet named by latest
    else:
        partial = root / f".tmp-step-{crash_step:08d}"
        assert partial.is_dir() and not (partial / "state.json").exists()

    proc = run_train(cfg, workdir, extra=["--resume", "auto"])
    assert f"step-{SAVE_EVERY:08d}, step {SAVE_EVERY} of {STEPS}" in proc.stdout
    assert_same_as_reference(out, reference)


def changed(base: dict, **sections) -> dict:
    cfg = json.loads(json.dumps(base))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.mark.parametrize(
    "change,named",
    [
        ({"train": {"lr": 0.02}}, "train.lr: 0.01 in the checkpoint, 0.02 now"),
        ({"data": {"seq_len": 40}}, "data.seq_len: 48 in the checkpoint, 40 now"),
        ({"train": {"micro_batch_size": 2}}, "train.micro_batch_size"),
        ({"train": {"grad_accum": 2}}, "train.grad_accum"),
        ({"train": {"lr_scheduler": "linear"}}, "train.lr_scheduler"),
        ({"train": {"seed": 4}}, "train.seed"),
        ({"plan": {"attention_r": 8}}, "plan.attention_r"),
        ({"deepspeed": {"overrides": {"zero_optimization": {"stage": 2}}}}, "deepspeed zero_optimization.stage: 3"),
    ],
)
def test_resume_with_a_changed_setting_is_refused(workdir, reference, change, named):
    checkpoint = Checkpoint.read(resolve_checkpoint("auto", reference))
    cfg = validate_tree(changed(job(workdir, "reference"), **change), "test")
    with pytest.raises(ConfigError, match="train.resume: .* different settings: ") as info:
        checkpoint.check_compatible(cfg.model_dump(), 2, build_ds_config(cfg, 2, torch.float32))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_resume_allows_operational_changes_and_refuses_other_plans_models_and_data(workdir, reference, tmp_path):
    checkpoint = Checkpoint.read(resolve_checkpoint("auto", reference))
    cfg = validate_tree(
        changed(
            job(workdir, "reference"),
            train={"save_every": 1, "keep_last": 5, "output_dir": str(tmp_path), "log_every": 3},
        ),
        "t",
    )
    checkpoint.check_compatible(cfg.model_dump(), 2, build_ds_config(cfg, 2, torch.float32))  # no error

    with pytest.raises(ConfigError, match=r"written by 2 ranks, this run has 1; resume on 2 ranks"):
        checkpoint.check_compatible(cfg.model_dump(), 1, build_ds_config(cfg, 1, torch.float32))

    plan = Plan.load(reference / "plan.json")
    moved = [dataclasses.replace(m, layer=1) for m in plan.modules if m.layer == plan.layers[0]]
    Plan(plan.rule, plan.num_layers, plan.layers_path, [1], moved, plan.score_captured).save(
        tmp_path / "other_plan.json"
    )
    cfg_plan = validate_tree(changed(job(workdir, "reference"), plan={"plan": str(tmp_path / "other_plan.json")}), "t")
    with pytest.raises(ConfigError, match=r"plan.plan: .* adapts layers \[1\] .* the checkpoint .* layers"):
        checkpoint.check_compatible(cfg_plan.model_dump(), 2, build_ds_config(cfg_plan, 2, torch.float32))

    saved = checkpoint.state["fingerprints"]
    other_model = save_tiny_llama(tmp_path / "other_model", rms_norm_eps=1e-5)
    from aletheia_ds.config import ModelSection
    from aletheia_ds.model import fingerprint

    with pytest.raises(ConfigError, match=r"different model.path \(rms_norm_eps: 1e-06 in the checkpoint, 1e-05 now"):
        checkpoint.check_fingerprints({**saved, "model": fingerprint(ModelSection(path=str(other_model)))})
    with pytest.raises(ConfigError, match=r"different data: 400 train / 200 held-out rows then, 399 / 200 now"):
        checkpoint.check_fingerprints({**saved, "data": "0" * 64, "train_rows": 399})


def test_one_process_resuming_a_two_rank_checkpoint_gets_one_line(workdir, reference, tmp_path):
    cfg = job(workdir, "reference")
    cfg["train"]["output_dir"] = str(tmp_path / "elsewhere")
    proc = run_train(cfg, tmp_path, nprocs=0, check=False, extra=["--resume", str(reference / "checkpoints")])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "was written by 2 ranks, this run has 1" in errors[0]
    assert not (tmp_path / "elsewhere").exists()


def test_which_checkpoint_a_run_continues_from(workdir, reference, tmp_path):
    def resume_of(output_dir, resume=None):
        cfg = validate_tree(
            changed(job(workdir, "reference"), train={"output_dir": str(output_dir), "resume": resume}), "t"
        )
        ctx = DistContext(
            rank=0,
            world_size=2,
            local_rank=0,
            device=torch.device("cpu"),
            ds_config=build_ds_config(cfg, 2, torch.float32),
        )
        return find_resume(ctx, cfg)

    assert resume_of(reference, "auto").step == STEPS
    assert resume_of(tmp_path / "new", "auto") is None  # auto with nothing to resume: a fresh start
    assert resume_of(tmp_path / "new", str(reference)).path == reference / "checkpoints" / f"step-{STEPS:08d}"
    assert resume_of(tmp_path / "new", str(reference / "checkpoints" / "step-00000004")).step == 4
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run .* --resume auto"):
        resume_of(reference)  # a fresh run must not mix its checkpoints with an earlier run's
    with pytest.raises(ConfigError, match=r"train.resume: '/nonexistent' is neither a checkpoint"):
        resume_of(tmp_path / "new", "/nonexistent")
    with pytest.raises(ConfigError, match=r"train.resume: must be 'auto' or a checkpoint path"):
        load_config(["train.resume="])


def test_engine_state_is_unpickled_weights_only(reference, tmp_path):
    from aletheia_ds.dist import weights_only_checkpoint_engine

    loader = weights_only_checkpoint_engine()(None)
    shards = sorted((reference / "checkpoints" / f"step-{STEPS:08d}" / "ds").glob("*.pt"))
    assert len(shards) == 4  # model and optimizer states of each rank
    assert all(isinstance(loader.load(str(f), map_location="cpu"), dict) for f in shards)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer_state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"refusing to unpickle .*evil.pt: .*GLOBAL posix.system"):
        loader.load(str(tmp_path / "evil.pt"), map_location="cpu")
    assert not marker.exists()


def test_a_load_that_disagrees_with_the_saved_adapter_is_caught(reference, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from aletheia_ds.checkpoint import _adapter_difference

    saved = reference / "checkpoints" / f"step-{STEPS:08d}" / "adapter"
    assert _adapter_difference(saved, reference / "adapter") is None  # the final export equals the checkpoint's
    shutil.copytree(saved, tmp_path / "fresh")
    tensors = load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = torch.nextafter(tensors[name].view(-1)[0], torch.tensor(1e9))  # one ulp
    save_file(tensors, str(tmp_path / "fresh" / "adapter_model.safetensors"))
    assert (
        _adapter_difference(saved, tmp_path / "fresh")
        == f"adapter_model.safetensors: 1 LoRA tensors differ (first: {name})"
    )


def start_paused(cfg, workdir, out, after_step):
    """Launch `cfg` on 2 ranks in the background; return once both ranks wait after step `after_step` (until
    the returned pause file is removed)."""
    pause = workdir / f"{out.name}.pause"
    pause.touch()
    log = (workdir / f"{out.name}.log").open("w")
    launcher = subprocess.Popen(
        train_cmd(cfg, workdir, script="tests/workers/pause_between_steps.py"),
        cwd=ROOT,
        env=rank_env(cpu=True, PAUSE_FILE=str(pause), PAUSE_AFTER_STEP=str(after_step)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None and logged_steps(out) < after_step:
        time.sleep(0.05)
    assert launcher.poll() is None, (workdir / f"{out.name}.log").read_text()[-3000:]
    return launcher, pause


@pytest.mark.slow
def test_second_job_refused_then_sigterm_checkpoints_and_resumes_exactly(workdir, reference):
    out = workdir / "preempted"
    cfg = job(workdir, out.name)
    launcher, pause = start_paused(cfg, workdir, out, after_step=3)
    second = run_train(cfg, workdir, check=False)  # the same output_dir while the first job trains there
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"train.output_dir: {out} is in use by another run (pid " in errors[0]

    os.kill(rank_pid(launcher, 1), signal.SIGTERM)  # one rank: the all-reduced flag stops both
    pause.unlink()
    assert launcher.wait(timeout=120) == 75, (workdir / "preempted.log").read_text()[-3000:]
    log = (workdir / "preempted.log").read_text()
    stopped = [line for line in log.splitlines() if line.startswith("stopped: SIGTERM")]
    assert len(stopped) == 1 and "Traceback" not in log, log[-3000:]
    assert stopped[0] == (
        f"stopped: SIGTERM: stopped after step 3 of {STEPS}; checkpoint "
        f"{out / 'checkpoints' / 'step-00000003'}; resume with --resume auto"
    )
    assert latest_step(out) == 3 and not (out / "eval.json").exists()

    proc = run_train(cfg, workdir, extra=["--resume", "auto"])
    assert f"step-00000003, step 3 of {STEPS}" in proc.stdout
    assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_resumes_exactly(workdir, reference):
    out = workdir / "interrupted"
    cfg = job(workdir, out.name)
    launcher, pause = start_paused(cfg, workdir, out, after_step=3)
    for rank in (0, 1):  # a terminal's Ctrl-C reaches every process of the foreground job
        os.kill(rank_pid(launcher, rank), signal.SIGINT)
    assert launcher.wait(timeout=120) != 0
    pause.unlink()
    log = (workdir / "interrupted.log").read_text()
    lines = [line for line in log.splitlines() if "interrupted at" in line]
    assert (
        lines
        == [
            f"stopped: interrupted at step 3 (last checkpoint: {out / 'checkpoints' / 'step-00000002'}); "
            "resume with --resume auto"
        ]
        and "Traceback" not in log
    ), log[-3000:]

    proc = run_train(cfg, workdir, extra=["--resume", "auto"])
    assert f"step-00000002, step 2 of {STEPS}" in proc.stdout
    assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(workdir, reference):
    import shutil

    out = workdir / "damaged"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / f"step-{STEPS:08d}"
    victim = seeded_random("damaged file").choice(
        sorted(
            [
                *(newest / "ds").rglob("*optim_states.pt"),
                *(newest / "ds").rglob("*model_states.pt"),
                *(newest / "rng").glob("*.safetensors"),
            ]
        )
    )
    with open(victim, "r+b") as handle:
        handle.truncate(victim.stat().st_size // 2)
    proc = run_train(job(workdir, out.name), workdir, extra=["--resume", "auto"])
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("resume: skipping damaged")]
    assert len(skipped) == 1 and f"{newest.name}: {victim.relative_to(newest)} has " in skipped[0], proc.stdout[-3000:]
    assert f"continuing from step-{STEPS - SAVE_EVERY:08d}" in skipped[0]
    assert_same_as_reference(out, reference)


def test_no_intact_checkpoint_is_one_line(reference, tmp_path):
    import shutil

    from aletheia_ds.checkpoint import checkpoint_candidates, first_intact

    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    for step in (4, 6):
        (tmp_path / "checkpoints" / f"step-{step:08d}" / "rng" / "rank-00001.safetensors").write_bytes(b"")
    with pytest.raises(
        ConfigError,
        match=r"^train.resume: no intact checkpoint in .*step-00000006: "
        r"rng/rank-00001.safetensors has 0 bytes.*step-00000004: ",
    ) as info:
        first_intact(checkpoint_candidates("auto", tmp_path))
    assert "\n" not in str(info.value)
