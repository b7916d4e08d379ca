from pathlib import Path

import pytest

from chatterbox.config import CONFIG_DIR, ChatterBoxConfig, ConfigError, dump_config, load_config

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*_stage*.yaml"))


def test_presets_exist_for_every_size_and_stage():
    assert {f"{size}_stage{stage}" for size in ("tiny", "7b", "13b") for stage in (1, 2)} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert cfg.name == name


def test_13b_recipe_values_are_upstreams():
    s1, s2 = load_config("13b_stage1"), load_config("13b_stage2")
    for cfg in (s1, s2):
        t = cfg.train
        assert (t.lr, t.betas, t.weight_decay, t.gradient_clipping) == (3e-5, (0.9, 0.95), 0.0, 1.0)
        assert (t.epochs, t.steps_per_epoch, t.warmup_steps, t.zero_stage) == (5, 3000, 50, 2)
        assert cfg.model.language.lora_r == 16 and cfg.model.language.lora_target_modules == ["q_proj", "v_proj"]
        assert cfg.model.language.hidden_size == 5120 and cfg.model.vision.backbone == "swin_B_384_22k"
        assert all((s.micro_batch_size, s.gradient_accumulation_steps) == (6, 20) for s in t.streams.values())
    assert s1.train.stage == 1 and set(s1.train.streams) == {"grounding"}
    assert s2.train.stage == 2
    assert {k: v.every_n_steps for k, v in s2.train.streams.items()} == {"referring": 10, "grounding": 1, "vqa": 5}
    assert s2.train.init_from == s1.train.output_dir


def test_overrides_apply_with_types():
    cfg = load_config("tiny_stage1", ["train.lr=1e-4", "train.betas=[0.8, 0.9]", "model.language.lora_r=4",
                                      "train.precision=fp32", "data.bad_record_policy=skip-and-count"])
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.8, 0.9)
    assert cfg.model.language.lora_r == 4 and cfg.train.precision == "fp32"
    assert cfg.data.bad_record_policy == "skip-and-count"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'.*did you mean 'lr'"),
        ("modle.language.lora_r=4", r"did you mean 'model'"),
        ("model.language.lora_r=four", r"model.language.lora_r: expected an integer"),
        ("train.precision=fp8", r"train.precision: 'fp8' is not one of"),
        ("train.betas=[0.9]", r"train.betas: expected 2 items"),
        ("model.vision.num_querys=900", r"unknown config key 'model.vision.num_querys'.*did you mean 'num_queries'"),
        ("train.lr", r"must look like key.path=value"),
        ("train.learning_rate=1e-4", r"unknown config key 'train.learning_rate'.*did you mean 'lr'"),
        # numbers out of range: one error at load naming the key, not a crash in torch or DeepSpeed
        ("train.lr=-1e-4", r"^train.lr=-0.0001 must be > 0$"),
        ("train.streams.grounding.micro_batch_size=0", r"^train.streams.grounding.micro_batch_size=0 must be >= 1$"),
        ("train.streams.grounding.gradient_accumulation_steps=0", r"gradient_accumulation_steps=0 must be >= 1"),
        ("train.warmup_steps=-5", r"^train.warmup_steps=-5 must be >= 0$"),
        ("train.keep_last_checkpoints=0", r"keep_last_checkpoints=0 must be >= 1"),
        ("train.zero_stage=4", r"^train.zero_stage=4 must be between 0 and 3$"),
        # the tiny preset runs ZeRO-0
        ("train.offload_parameters=true", r"^train.offload_parameters=true needs train.zero_stage=3 \(got 0\)"),
        ("train.offload_optimizer=true", r"^train.offload_optimizer=true needs train.zero_stage >= 1"),
        ("train.betas=[0.9, 1.0]", r"each must be in \[0, 1\)"),
        ("train.gradient_clipping=nan", r"gradient_clipping=nan must be a finite number"),
        ("model.language.lora_dropout=1.5", r"lora_dropout=1.5 must be between 0 and 1"),
        ("model.vision.box_threshold=-0.1", r"box_threshold=-0.1: must lie in \[0, 1\]"),
        ("model.region_encoder.level_sizes=[16, 0, 4, 2]", r"level_sizes=0 must be >= 1"),
        ("data.num_workers=-1", r"data.num_workers=-1 must be >= 0"),
        ("eval.max_new_tokens=0", r"eval.max_new_tokens=0 must be >= 1"),
        ("chat.port=70000", r"chat.port=70000 must be between 0 and 65535"),
        ("train.lr_scale.region_encoder=0", r"^train.lr_scale.region_encoder=0.0 must be > 0$"),
        ("train.lr_scale.region_encodr=0.1", r"^train.lr_scale.region_encodr: no such parameter group; groups: "),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_stage1", [override])


def test_unknown_key_in_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIG_DIR / 'tiny_stage1.yaml'}\ntrain:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"'train.warmup_step'.*did you mean 'warmup_steps'"):
        load_config(bad)


def test_wrong_type_in_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'many'"):
        load_config(bad)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no preset of that name"):
        load_config("tiny_stage9")


def test_7b_stage2_keeps_the_7b_model_and_stage2_streams():
    cfg = load_config("7b_stage2")
    assert cfg.model.language.hidden_size == 4096 and cfg.model.language.num_hidden_layers == 32
    assert cfg.train.stage == 2 and set(cfg.train.streams) == {"referring", "grounding", "vqa"}
    assert cfg.train.init_from == load_config("7b_stage1").train.output_dir


def test_data_image_sizes_follow_the_model_unless_set():
    cfg = load_config("tiny_stage1")
    assert (cfg.data.dino_image_size, cfg.data.clip_image_size) == (128, 112)
    cfg = load_config("tiny_stage1", ["model.vision.image_size=256", "model.vision.swin_pretrain_img_size=256"])
    assert cfg.data.dino_image_size == 256
    assert load_config("13b_stage1").data.dino_image_size == 512
    assert load_config("13b_stage1").data.clip_resize == "per_source"
    assert load_config("tiny_stage1", ["model.clip.resize=squash"]).data.clip_resize == "squash"


def test_values_shared_by_data_and_model_must_agree():
    with pytest.raises(ConfigError, match=r"data.dino_image_size=512 must equal model.vision.image_size=128"):
        load_config("tiny_stage1", ["data.dino_image_size=512"])
    with pytest.raises(ConfigError, match=r"data.clip_resize=squash must equal model.clip.resize=per_source"):
        load_config("13b_stage1", ["data.clip_resize=squash"])
    with pytest.raises(ConfigError, match=r"model.query_head.out_dim=256 must equal model.vision.hidden_dim=32"):
        load_config("tiny_stage1", ["model.query_head.out_dim=256"])


def test_a_bad_config_on_the_command_line_is_one_error_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "startup_stage1.py", "--config", "tiny_stage1", "--set", "train.lr=-1"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "error: train.lr=-1.0 must be > 0\n"
