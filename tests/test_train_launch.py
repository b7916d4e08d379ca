"""The stage launchers build the right command: one CPU process, or the deepspeed launcher on GPUs."""
import sys

import pytest
import torch

from chatterbox.train.launch import build_command, parse_args


def test_cpu_config_runs_in_one_process():
    args = parse_args(1, ["--config", "tiny_stage1", "--set", "train.lr=1e-4", "--resume", "auto", "--max-steps", "5"])
    assert build_command(1, args) == [sys.executable, "-m", "chatterbox.train.run", "--config", "tiny_stage1",
                                      "--set", "train.lr=1e-4", "--set", "train.resume=auto", "--max-steps", "5"]


def test_gpu_configs_go_through_the_deepspeed_launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    args = parse_args(2, ["--config", "13b_stage2", "--gpus", "8", "--master-port", "29600"])
    cmd = build_command(2, args)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "8" and cmd[cmd.index("--master_port") + 1] == "29600"
    assert cmd[cmd.index("--module") + 1] == "chatterbox.train.run" and cmd[-2:] == ["--config", "13b_stage2"]
    multi_node = build_command(2, parse_args(2, ["--config", "13b_stage2", "--hostfile", "hosts.txt"]))
    assert multi_node[multi_node.index("--hostfile") + 1] == "hosts.txt"
    single = build_command(1, parse_args(1, ["--config", "13b_stage1", "--gpus", "1"]))
    assert single[:3] == [sys.executable, "-m", "chatterbox.train.run"]


def test_wrong_stage_and_missing_gpus_are_refused(monkeypatch):
    with pytest.raises(SystemExit, match="stage-2 config; use startup_stage2.py"):
        build_command(1, parse_args(1, ["--config", "tiny_stage2"]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match="--gpus 4 but only 2 GPU"):
        build_command(1, parse_args(1, ["--config", "13b_stage1", "--gpus", "4"]))


def test_synthetic_7b_config_builds_off_the_host_in_the_training_dtype():
    """The multi-GPU smoke config constructs its random 7B directly on the target device (meta here: no memory)."""
    from chatterbox.config import load_config
    from chatterbox.train.run import build_model

    cfg = load_config("configs/7b_stage1_synthetic.yaml")
    model = build_model(cfg, torch.device("meta"), torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.causal_lm.model.layers) == 32
    # LLaMA-2-7B's decoder without embeddings: 32 layers of 202,383,360 + the final norm.
    decoder = model.causal_lm.model
    base = sum(p.numel() for n, p in decoder.named_parameters() if not any(k in n for k in ("lora_", "embed_tokens", "mm_projector")))
    assert base == 32 * 202_383_360 + 4096
    assert torch.get_default_dtype() == torch.float32  # the construction context restored it
