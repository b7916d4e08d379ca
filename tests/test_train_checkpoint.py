"""Checkpointing through the real DeepSpeed engine on a CPU (gloo), with a small model."""
import os
import shutil

import pytest
import torch

from chatterbox.config import StreamConfig, TrainConfig
from chatterbox.train import checkpoint as ckpt
from chatterbox.train.checkpoint import (CheckpointError, CheckpointManager, output_dir_lock, rng_state,
                                         set_rng_state)
from chatterbox.train.distributed import init_distributed
from chatterbox.train.engine import build_engine, deepspeed_config, total_optimizer_steps


@pytest.fixture(scope="module")
def dist():
    return init_distributed("cpu")


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(8, 16)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(16, 1)
        self.drop = torch.nn.Dropout(0.2)  # consumes RNG: resume must restore it

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.frozen(x)))).pow(2).mean()


def train_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), epochs=1, steps_per_epoch=10, lr=1e-2, warmup_steps=2,
                precision="fp32", streams={"grounding": StreamConfig(2, 2, 1)}, keep_last_checkpoints=2)
    base.update(kw)
    return TrainConfig(**base)


def run(engine, steps, start=0, data_seed=123):
    losses = []
    for step in range(start, steps):
        g = torch.Generator().manual_seed(data_seed + step)
        for _ in range(engine.gradient_accumulation_steps()):
            loss = engine(torch.randn(2, 8, generator=g))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def test_deepspeed_config_matches_upstream_recipe():
    cfg = deepspeed_config(TrainConfig(), StreamConfig(), world_size=8)
    assert cfg["train_batch_size"] == 6 * 20 * 8 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    stage2 = TrainConfig(epochs=1, steps_per_epoch=100, streams={
        "referring": StreamConfig(every_n_steps=10), "grounding": StreamConfig(), "vqa": StreamConfig(every_n_steps=5)})
    assert total_optimizer_steps(stage2) == 10 + 100 + 20
    assert total_optimizer_steps(TrainConfig(epochs=1, steps_per_epoch=100, schedule_stepping="upstream_double",
                                             streams=stage2.streams)) == 100


def test_save_resume_reproduces_losses_and_only_trainable_weights_are_stored(dist, tmp_path):
    cfg = train_config(tmp_path / "a")
    torch.manual_seed(7)
    engine, _, sched = build_engine(Toy(), cfg, dist.world_size)
    reference = run(engine, 6)

    cfg_b = train_config(tmp_path / "b")
    torch.manual_seed(7)
    engine_b, _, _ = build_engine(Toy(), cfg_b, dist.world_size)
    manager = CheckpointManager(cfg_b.output_dir, keep_last=2)
    first = run(engine_b, 3)
    manager.save(engine_b, 3, {"step": 3, "rng": rng_state()})
    assert manager.latest() == "step_00000003"
    module_file = manager.root / "step_00000003" / "mp_rank_00_model_states.pt"
    saved = torch.load(module_file, weights_only=False)["module"]
    assert set(saved) == {"head.weight", "head.bias"}  # frozen weights are not duplicated

    torch.manual_seed(999)  # a fresh process would start from another RNG state
    engine_c, _, sched_c = build_engine(Toy(), cfg_b, dist.world_size)
    state = manager.load(engine_c, manager.resolve("auto"))
    set_rng_state(state["rng"])
    rest = run(engine_c, 6, start=state["step"])
    assert first + rest == reference
    assert sched_c.get_last_lr() == sched.get_last_lr()


def test_crash_during_save_leaves_previous_checkpoint(dist, tmp_path, monkeypatch):
    cfg = train_config(tmp_path)
    engine, _, _ = build_engine(Toy(), cfg, dist.world_size)
    manager = CheckpointManager(cfg.output_dir, keep_last=2)
    run(engine, 1)
    manager.save(engine, 1, {"step": 1})
    before = sorted(p.name for p in (manager.root / "step_00000001").iterdir())

    real_save = torch.save

    def crash(obj, f, *a, **k):
        if "trainer_state" in str(f):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", crash)
    run(engine, 2, start=1)
    with pytest.raises(OSError, match="simulated"):
        manager.save(engine, 2, {"step": 2})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert manager.latest() == "step_00000001" and manager.tags() == ["step_00000001"]
    assert sorted(p.name for p in (manager.root / "step_00000001").iterdir()) == before
    # The next save cleans the staging leftovers and succeeds; keep-last-2 prunes the oldest.
    manager.save(engine, 2, {"step": 2})
    manager.save(engine, 3, {"step": 3})
    assert manager.tags() == ["step_00000002", "step_00000003"] and manager.latest() == "step_00000003"
    assert not any(p.name.startswith(".staging") for p in manager.root.iterdir())


def test_bad_resume_requests_are_clear(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    assert manager.resolve("") is None and manager.resolve("auto") is None
    with pytest.raises(CheckpointError, match="no checkpoint 'step_00000009'"):
        manager.resolve("step_00000009")
    (manager.root / "latest").write_text("step_00000004")
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.latest()
    (manager.root / "step_00000004").mkdir()
    with pytest.raises(CheckpointError, match="trainer_state_rank0.pt"):
        manager.load(None, "step_00000004")


def test_keep_last_never_prunes_checkpoints_newer_than_the_one_written(dist, tmp_path):
    """Resumed at an older checkpoint, a run's keep-last-K must not delete the newer ones of the first
    history (they were pruned by name before, and `latest` then named a deleted folder)."""
    engine, _, _ = build_engine(Toy(), train_config(tmp_path), dist.world_size)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6, 8):
        manager.save(engine, step, {"step": step})
    assert manager.tags() == ["step_00000006", "step_00000008"]
    manager.save(engine, 7, {"step": 7})  # a run resumed at step 6
    assert manager.tags() == ["step_00000006", "step_00000007", "step_00000008"]
    assert manager.latest() == "step_00000007"
    manager.save(engine, 8, {"step": 8})  # its own step 8 replaces the old one; its step 6 is pruned
    assert manager.tags() == ["step_00000007", "step_00000008"] and manager.latest() == "step_00000008"


def test_a_fresh_run_refuses_earlier_checkpoints_or_moves_them_aside(dist, tmp_path):
    engine, _, _ = build_engine(Toy(), train_config(tmp_path), dist.world_size)
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.start_fresh()  # nothing there: fine
    manager.save(engine, 3, {"step": 3})
    files = sorted(p.name for p in (manager.root / "step_00000003").iterdir())
    with pytest.raises(CheckpointError, match=r"holds checkpoints of an earlier run \(step_00000003\).*--resume auto"):
        manager.start_fresh()
    assert manager.tags() == ["step_00000003"] and manager.latest() == "step_00000003"
    manager.start_fresh(overwrite=True)
    assert manager.tags() == [] and manager.latest() is None
    aside, = tmp_path.glob("checkpoints.replaced-*")
    assert sorted(p.name for p in (aside / "step_00000003").iterdir()) == files
    assert (aside / "latest").read_text() == "step_00000003"


class Payload:
    """What a malicious checkpoint would carry: unpickling it runs os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_no_checkpoint_file_can_run_code_and_a_broken_one_is_named(dist, tmp_path):
    import importlib.util

    from chatterbox.train.reshard import merged_optimizer_state

    engine, _, _ = build_engine(Toy(), train_config(tmp_path), dist.world_size)
    manager = CheckpointManager(tmp_path, keep_last=2)
    run(engine, 1)
    directory = manager.save(engine, 1, {"step": 1, "rng": rng_state()})
    assert manager.trainer_state("step_00000001", 0)["step"] == 1  # our own files load weights-only
    assert merged_optimizer_state(directory)[0]["fp32"].numel() == 16 + 1
    script = ckpt.Path(__file__).parent.parent / "scripts" / "export.py"
    spec = importlib.util.spec_from_file_location("export_script", script)
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)

    marker = tmp_path / "code_ran"
    for name in ("trainer_state_rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        file = directory / name
        original = torch.load(file, weights_only=False)
        torch.save({**original, "planted": Payload(marker)}, file)
        attempts = [lambda: manager.load(engine, "step_00000001")]  # DeepSpeed's own reads included
        if name == "trainer_state_rank0.pt":
            attempts.append(lambda: manager.trainer_state("step_00000001", 0))
        if name == "mp_rank_00_model_states.pt":
            attempts.append(lambda: export.load_checkpoint_into(Toy(), directory))
        if name.startswith("zero"):
            attempts.append(lambda: merged_optimizer_state(directory))
        for attempt in attempts:
            with pytest.raises(CheckpointError, match=rf"{name}: refused to load .*posix.mkdir"):
                attempt()
        assert not marker.exists()
        torch.save(original, file)

    state_file = directory / "trainer_state_rank0.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=rf"{state_file}: unreadable checkpoint file"):
        manager.trainer_state("step_00000001", 0)


def test_a_zero_stage_0_checkpoint_keeps_its_optimizer_in_the_model_states_and_resumes(dist, tmp_path):
    """The tiny preset trains with ZeRO stage 0 (one CPU process): no *optim_states.pt is written."""
    engine, _, _ = build_engine(Toy(), train_config(tmp_path, zero_stage=0), dist.world_size)
    manager = CheckpointManager(tmp_path, keep_last=2)
    run(engine, 2)
    directory = manager.save(engine, 2, {"step": 2, "rng": rng_state()})
    assert not list(directory.glob("*optim_states.pt"))
    assert manager.resolve("auto") == "step_00000002"
    assert manager.load(engine, "step_00000002")["step"] == 2
    # a ZeRO-2 checkpoint without its optimizer file is still refused
    engine2, _, _ = build_engine(Toy(), train_config(tmp_path / "z2"), dist.world_size)
    manager2 = CheckpointManager(tmp_path / "z2", keep_last=2)
    run(engine2, 1)
    for optim in manager2.save(engine2, 1, {"step": 1, "rng": rng_state()}).glob("*optim_states.pt"):
        optim.unlink()
    with pytest.raises(CheckpointError, match="has no \\*optim_states.pt: incomplete checkpoint"):
        manager2.resolve("step_00000001")


def test_resume_auto_falls_back_to_the_newest_usable_checkpoint(dist, tmp_path, caplog):
    engine, _, _ = build_engine(Toy(), train_config(tmp_path), dist.world_size)
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save(engine, step, {"step": step, "rng": rng_state()})
    optim = manager.root / "step_00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:-200])  # truncated (a copy cut short, a full disk)
    with caplog.at_level("WARNING", logger="chatterbox.train.checkpoint"):
        assert manager.resolve("auto") == "step_00000002"
    assert f"skipped: {optim}: truncated or corrupt" in caplog.text
    with pytest.raises(CheckpointError, match=f"{optim}: truncated or corrupt"):
        manager.resolve("step_00000003")  # asked for by name: no fallback, the file is named
    state = manager.load(engine, manager.resolve("auto"))
    assert state["step"] == 2

    (manager.root / "step_00000002" / "trainer_state_rank0.pt").unlink()
    (manager.root / "latest").write_text("")  # an emptied pointer
    assert manager.resolve("auto") == "step_00000001"
    (manager.root / "step_00000001" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint under .*holds '', not a checkpoint tag; .*"
                                              r"step_00000003.*truncated.*step_00000002 has no trainer_state.*"
                                              r"mp_rank_00_model_states.pt: truncated or corrupt"):
        manager.resolve("auto")


def test_one_run_at_a_time_holds_an_output_dir(tmp_path):
    out = tmp_path / "run"
    with output_dir_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(CheckpointError, match=rf"in use by another training run \(pid {os.getpid()}"):
            with output_dir_lock(out):
                pass
        with output_dir_lock(tmp_path / "other"):  # another folder is free
            pass
    with output_dir_lock(out):  # released when the block ends
        pass


@pytest.mark.parametrize("saved_ranks, resumed_ranks, precision", [(2, 1, "fp32"), (1, 2, "fp32"), (2, 1, "bf16")])
def test_resume_on_a_different_number_of_ranks(saved_ranks, resumed_ranks, precision, tmp_path):
    """ZeRO-2 state saved on N ranks continues exactly on M ranks (same batches on every rank); bf16 engines
    name their optimizer files differently (as on GPUs)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("reshard_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)

    def launch(ranks, mode):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--standalone", str(worker), str(tmp_path), mode, "3", "2", precision] if ranks > 1 else \
              [sys.executable, str(worker), str(tmp_path), mode, "3", "2", precision]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(saved_ranks, "save")
    launch(resumed_ranks, "resume")
    original = json.loads((tmp_path / "params_save.json").read_text())
    resumed = json.loads((tmp_path / "params_resume.json").read_text())
    for a, b in zip(original, resumed):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-6)
