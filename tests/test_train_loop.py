"""The training recipe end to end on the tiny preset (CPU, DeepSpeed over gloo, synthetic data)."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatterbox.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from chatterbox.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("synthetic")
    return write_corpus(root, num_images=24, seed=0).data_paths()


def overrides(data_paths: dict, out: Path, steps: int, stage: int = 1, extra=()):
    sets = [f"data.paths.{k}={v}" for k, v in data_paths.items()]
    # ZeRO-2, as the GPU recipes run (the tiny preset's one CPU process uses stage 0): checkpoints and resume
    # are tested with the partitioned optimizer state
    sets += [f"train.output_dir={out}", f"train.steps_per_epoch={steps}", "train.warmup_steps=2",
             f"train.log_dir={out / 'runs'}", "data.num_workers=0", "train.zero_stage=2",
             "train.query_warmup_steps=0"]  # the warm-up has its own test
    if stage == 1:  # upstream's stage 1: the grounding stream alone
        sets.append("train.streams={grounding: {micro_batch_size: 2, gradient_accumulation_steps: 1, every_n_steps: 1}}")
    else:
        sets += [f"train.streams.{name}.micro_batch_size=2" for name in ("referring", "grounding", "vqa")]
    return sets + list(extra)


# Upstream's frozen set; the tiny preset trains these too (its weights start random).
UPSTREAM_FREEZES = ["model.clip.freeze=true", "model.language.freeze_base=true", "model.vision.freeze_backbone=true"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_one_optimizer_step_changes_exactly_the_trainable_parameters(stage, synthetic_data, tmp_path):
    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.loop import Trainer
    from chatterbox.train.run import build_model, build_streams, seed_everything

    cfg = load_config(f"tiny_stage{stage}", overrides(synthetic_data, tmp_path, 3, stage,
                                                      ["train.init_from=", *UPSTREAM_FREEZES]))
    dist = init_distributed("cpu")
    seed_everything(0, 0)
    model = build_model(cfg)
    # remove_duplicate=False: the vision branch's box head is one module registered under several names
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    before = snapshot(model)
    trainer = Trainer(cfg, dist, model, build_streams(cfg, model.tokenizer, dist))
    trainer.train_step()
    # lr is 0 at the first optimizer step (linear warm-up from 0): take a second step
    trainer.train_step()
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_changed = changed - trainable
    assert not frozen_changed, f"frozen tensors changed: {sorted(frozen_changed)[:5]}"
    groups = {"lora_", "query_head.", "vision_branch.transformer."}
    if stage == 2:
        groups |= {"region_encoder.", "embed_tokens", "lm_head"}
    for group in groups:
        assert any(group in k for k in changed), f"no parameter of {group!r} was updated"
    assert not any(k.startswith("vision_branch.backbone") for k in changed)
    assert not any(k.startswith("clip_tower.") for k in changed)


def test_a_non_finite_loss_stops_before_the_optimizer_step_and_names_the_micro_batch(synthetic_data, tmp_path):
    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.loop import Trainer
    from chatterbox.train.run import build_model, build_streams, seed_everything

    cfg = load_config("tiny_stage1", overrides(synthetic_data, tmp_path, 3, 1, [
        "train.init_from=", "train.streams.grounding.gradient_accumulation_steps=3"]))
    dist = init_distributed("cpu")
    seed_everything(0, 0)
    model = build_model(cfg)
    trainer = Trainer(cfg, dist, model, build_streams(cfg, model.tokenizer, dist))
    trainer.train_step()  # lr is 0 at the first optimizer step; the second one would move the weights
    forward, calls, seen = model.forward, [], []

    def second_call_diverges(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(kwargs.get("sample_ids"))
        if len(calls) == 2:
            seen.append(kwargs.get("sample_ids"))
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    model.forward = second_call_diverges
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"stream 'grounding' at step 1 \(micro-batch 2 of 3\)") as err:
        trainer.train_step()
    assert len(calls) == 3 and seen[0] and str(list(seen[0])) in str(err.value)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _train_cmd(cfg_name, sets):
    cmd = [sys.executable, "-m", "chatterbox.train.run", "--config", cfg_name]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MASTER_PORT", None)
    return env


def _losses(out: Path) -> dict[int, float]:
    summary = json.loads((out / "train_summary.json").read_text())
    return {row["step"]: row["grounding/loss"] for row in summary["losses"]}


def test_sigkill_and_resume_reproduces_the_uninterrupted_loss_sequence(synthetic_data, tmp_path):
    steps = 12
    ref_out, run_out = tmp_path / "reference", tmp_path / "killed"
    extra = ["train.save_every_steps=3", "train.keep_last_checkpoints=2"]
    subprocess.run(_train_cmd("tiny_stage1", overrides(synthetic_data, ref_out, steps, extra=extra)),
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    reference = _losses(ref_out)
    assert sorted(reference) == list(range(steps))

    proc = subprocess.Popen(_train_cmd("tiny_stage1", overrides(synthetic_data, run_out, steps, extra=extra)),
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().choice([3, 6])  # a random checkpoint to have passed before the kill
    latest = run_out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and int(latest.read_text().split("_")[1]) >= kill_after:
            time.sleep(random.uniform(0.0, 0.3))  # somewhere inside the next steps
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make it longer")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_out / "train_summary.json").exists()

    resumed = subprocess.run(
        _train_cmd("tiny_stage1", overrides(synthetic_data, run_out, steps, extra=extra + ["train.resume=auto"])),
        env=_env(), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _losses(run_out)
    first_resumed = min(after)
    assert first_resumed >= kill_after and first_resumed % 3 == 0
    assert {s: reference[s] for s in after} == after  # bit-identical losses from the resume point on


def test_a_fresh_run_into_a_used_output_dir_loses_no_checkpoint(synthetic_data, tmp_path):
    """The launcher, as a user types it: a second fresh run into a finished run's folder is refused (its
    checkpoints and config stay as they were); --overwrite moves them aside and starts from step 0."""
    out = tmp_path / "run"
    launch = [sys.executable, "startup_stage1.py", "--config", "tiny_stage1"]
    for s in overrides(synthetic_data, out, 4, extra=["train.save_every_steps=2"]):
        launch += ["--set", s]
    subprocess.run(launch, check=True, env=_env(), cwd=REPO, capture_output=True)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["data"] == {"grounding": {"skipped_records": 0, "skipped_record_ids": [], "truncated_samples": 0,
                                             "rounds_dropped": 0}}
    checkpoints = out / "checkpoints"
    kept = {p.name: p.stat().st_mtime_ns for p in checkpoints.rglob("*")}
    assert {"step_00000002", "step_00000004"} <= set(kept)
    config = (out / "config.yaml").read_text()

    again = subprocess.run(launch + ["--max-steps", "1", "--set", "train.lr=5e-4"], env=_env(), cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode != 0
    assert "holds checkpoints of an earlier run (step_00000002, step_00000004)" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.rglob("*")} == kept
    assert (out / "config.yaml").read_text() == config

    over = subprocess.run(launch + ["--max-steps", "1", "--overwrite"], env=_env(), cwd=REPO, capture_output=True,
                          text=True)
    assert over.returncode == 0, over.stderr[-3000:]
    aside, = out.glob("checkpoints.replaced-*")
    assert {p.name for p in aside.rglob("*")} == set(kept)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_training_worker_ends_with_its_launcher(sig, synthetic_data, tmp_path):
    """Killing startup_stage1.py (SIGKILL or SIGTERM) ends the worker it started: no orphan keeps training."""
    out = tmp_path / "run"
    launch = [sys.executable, "startup_stage1.py", "--config", "tiny_stage1"]
    for s in overrides(synthetic_data, out, 500, extra=["train.save_every_steps=1"]):
        launch += ["--set", s]
    launcher = subprocess.Popen(launch, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline:
            assert launcher.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        worker, = (int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split())
        assert _alive(worker)
        launcher.send_signal(sig)
        launcher.wait(timeout=60)
        deadline = time.time() + 60
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        launcher.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_export_from_checkpoint_matches_the_final_export(synthetic_data, tmp_path):
    from chatterbox.model.chatterbox import ChatterBox

    out = tmp_path / "run"
    subprocess.run(_train_cmd("tiny_stage1", overrides(synthetic_data, out, 4, extra=["train.save_every_steps=2"])),
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "scripts/export.py", "--run", str(out), "--out", str(exported)],
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    final = ChatterBox.from_pretrained(out / "export")
    again = ChatterBox.from_pretrained(exported)
    a, b = final.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_rank_run_resumes_on_one_rank(synthetic_data, tmp_path):
    """Stage 1 on 2 CPU ranks (gloo) stopped by --max-steps (which checkpoints there), then finished on 1 rank."""
    out = tmp_path / "run"
    # with the query warm-up: a fresh run does it, the resume does not (its weights come from the checkpoint)
    sets = overrides(synthetic_data, out, 6, extra=["train.save_every_steps=100", "train.query_warmup_steps=3"])
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chatterbox.train.run", "--config", "tiny_stage1", "--max-steps", "3"]
    for s in sets:
        two += ["--set", s]
    proc = subprocess.run(two, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["query_warmup"]["steps"] == 3
    tag = out / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in tag.glob("trainer_state_rank*.pt")) == ["trainer_state_rank0.pt",
                                                                          "trainer_state_rank1.pt"]
    one = subprocess.run(_train_cmd("tiny_stage1", sets + ["train.resume=auto"]), env=_env(), cwd=REPO,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 rank(s), now 1" in one.stderr
    assert json.loads((out / "train_summary.json").read_text())["query_warmup"] is None
    losses = _losses(out)
    assert sorted(losses) == [3, 4, 5] and all(math.isfinite(v) for v in losses.values())
    assert (out / "export" / "export.json").is_file()


def test_tensorboard_scalars_use_upstreams_names(synthetic_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    subprocess.run(_train_cmd("tiny_stage2", overrides(synthetic_data, out, 2, stage=2, extra=["train.init_from="])),
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    logs = EventAccumulator(str(out / "runs" / "tiny_stage2"))
    logs.Reload()
    tags = set(logs.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/vg_losses", "train/vqa_losses", "metrics/total_secs_per_batch",
            "metrics/data_secs_per_batch", "metrics/samples_per_sec", "metrics/tokens_per_sec"} <= tags
    assert {"streams/referring/lm_loss", "streams/grounding/grounding_loss", "streams/vqa/lm_loss"} <= tags
    # the criterion's terms for the stream that grounds, as upstream logs them (the LM-only streams have none)
    layers = ["", *(f"_{i}" for i in range(1)), "_interm"]  # the tiny preset: 2 decoder layers
    assert {f"streams/grounding/{term}{suffix}" for term in ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw")
            for suffix in layers} <= tags
    assert not any(tag.startswith(("streams/referring/loss_", "streams/vqa/loss_")) for tag in tags)
    step0 = {tag: logs.Scalars(tag)[0].value for tag in tags}
    assert step0["train/loss"] == pytest.approx(
        step0["streams/referring/loss"] + step0["streams/grounding/loss"] + step0["streams/vqa/loss"], rel=1e-6)
    assert step0["train/vqa_losses"] == pytest.approx(
        sum(step0[f"streams/{name}/lm_loss"] for name in ("referring", "grounding", "vqa")), rel=1e-6)


def test_move_batch_keeps_what_the_model_reads_on_the_host():
    from chatterbox.train.loop import move_batch

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "images_dino": torch.ones(2, 3, 4, 4),
             "offset": torch.arange(3), "region_boxes_xyxy_clip_norm": [torch.zeros(1, 4), torch.zeros(0, 4)],
             "grounding_targets_cxcywh_norm": [[torch.full((2, 4), 0.5)], []], "task": ["grounding", "grounding"]}
    moved = move_batch(batch, torch.device("meta"), torch.bfloat16)
    assert moved["input_ids"].is_meta and moved["images_dino"].dtype == torch.bfloat16
    assert all(b.is_meta and b.dtype == torch.float32 for b in moved["region_boxes_xyxy_clip_norm"])
    assert moved["offset"].device.type == "cpu" and moved["task"] == batch["task"]
    assert moved["grounding_targets_cxcywh_norm"][0][0].device.type == "cpu"


def _two_ranks(cfg_name, sets, max_steps=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chatterbox.train.run", "--config", cfg_name]
    cmd += ["--max-steps", str(max_steps)] if max_steps is not None else []
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)


def test_zero3_on_two_ranks_trains_resumes_and_exports_as_zero2(synthetic_data, tmp_path):
    """ZeRO-3 (every parameter partitioned: persistence threshold 0) against ZeRO-2 on 2 CPU ranks over gloo:
    the same loss sequence, through a checkpoint and a resume; the export written whole (the main rank gathers
    the slices), equal to the checkpoint's slices put together by scripts/export.py; a resume on another
    number of ranks refused by name; ZeRO-3 with the optimizer and the parameters offloaded to the host too."""
    from safetensors.torch import load_file

    steps, extra = 4, ["train.save_every_steps=2"]
    zero2, zero3, offload = tmp_path / "zero2", tmp_path / "zero3", tmp_path / "offload"
    proc = _two_ranks("tiny_stage1", overrides(synthetic_data, zero2, steps, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    partitioned = overrides(synthetic_data, zero3, steps, extra=extra + ["train.zero_stage=3",
                                                                         "train.zero3_persistence_threshold=0"])
    proc = _two_ranks("tiny_stage1", partitioned, max_steps=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = subprocess.run(_train_cmd("tiny_stage1", partitioned + ["train.resume=auto"]), env=_env(), cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode != 0
    assert "is a ZeRO-3 checkpoint of 2 rank(s): resume it on 2, not 1" in refused.stderr
    proc = _two_ranks("tiny_stage1", partitioned + ["train.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _two_ranks("tiny_stage1", overrides(synthetic_data, offload, 2, extra=[
        "train.zero_stage=3", "train.zero3_persistence_threshold=0", "train.offload_optimizer=true",
        "train.offload_parameters=true"]))
    assert proc.returncode == 0, proc.stderr[-3000:]

    reference = _losses(zero2)
    assert sorted(reference) == list(range(steps))
    for run in (zero3, offload):
        losses = _losses(run)  # the resumed run's summary holds the steps after the resume
        assert sorted(losses) == ([2, 3] if run == zero3 else [0, 1])
        for step, loss in losses.items():
            assert loss == pytest.approx(reference[step], rel=1e-4), (run.name, step)

    whole, sliced = load_file(zero2 / "export" / "model.safetensors"), load_file(zero3 / "export" / "model.safetensors")
    assert whole.keys() == sliced.keys()
    for name, value in whole.items():
        assert sliced[name].shape == value.shape, name
        torch.testing.assert_close(sliced[name], value, atol=2e-3, rtol=0, msg=name)
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "scripts/export.py", "--run", str(zero3), "--out", str(exported)],
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    again = load_file(exported / "model.safetensors")
    assert again.keys() == sliced.keys()
    assert all(torch.equal(again[k], sliced[k]) for k in again)


def test_query_warmup_teaches_the_query_both_words_and_leaves_the_vision_branch(synthetic_data, tmp_path):
    """chatterbox.train.query_warmup on a fresh tiny model: after 150 steps the [VG] query tells the colour and the
    kind of the shape its question names on further batches (chance: ~0.2 and ~0.35), at the configured warm-up
    rate; the vision branch is untouched and every parameter's requires_grad is as before."""
    from chatterbox.data.streams import build_stream
    from chatterbox.train.query_warmup import warm_up_query
    from chatterbox.train.run import build_model, seed_everything

    cfg = load_config("tiny_stage1", overrides(synthetic_data, tmp_path, 1, extra=["train.init_from="]))
    seed_everything(0, 0)
    model = build_model(cfg)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("vision_branch.")}
    language = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("query_head.")}
    batches = iter(build_stream(cfg.data, "grounding", model.tokenizer, batch_size=8, seed=0))
    result = warm_up_query(model, batches, steps=150, lr=cfg.train.query_warmup_lr, device=torch.device("cpu"),
                           dtype=torch.float32, eval_batches=8)
    assert result["questions"] >= 20
    assert result["colour_accuracy"] >= 0.6 and result["kind_accuracy"] >= 0.8, result
    assert all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if n in vision)
    assert not all(torch.equal(p, language[n]) for n, p in model.named_parameters() if n in language)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
