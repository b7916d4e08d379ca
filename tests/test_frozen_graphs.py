"""CUDA-graph replay of the frozen encoders (chatterbox.accel.frozen_graphs): the CPU fallback here, the
graphs themselves on a GPU (skipped without one; run by bench/gpu_bench_train.sh)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from chatterbox.accel import FrozenGraphRunner, use_frozen_encoder_graphs
from tests.test_model_gpu import fresh_model, run, to_cuda
from tests.test_model_chatterbox import make_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_encoder(device="cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(device).eval().requires_grad_(False)


def two_outputs(encoder: nn.Module):
    return lambda x: [encoder(x), encoder[0](x)]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def test_off_cuda_the_runner_calls_the_function_and_captures_nothing():
    encoder = small_encoder()
    runner = FrozenGraphRunner(two_outputs(encoder), encoder)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = runner(x)
    assert torch.equal(out[0], encoder(x)) and torch.equal(out[1], encoder[0](x))
    assert runner.captures == 0 and len(runner) == 0
    with pytest.raises(ValueError, match="max_graphs"):
        FrozenGraphRunner(two_outputs(encoder), encoder, max_graphs=0)


def test_the_model_switch_reaches_both_encoders_and_leaves_a_trainable_backbone_eager(tokenizer):
    from tests.test_model_chatterbox import build_tiny

    model = build_tiny(tokenizer).eval()  # no dropout: two forwards must agree
    use_frozen_encoder_graphs(model, max_graphs=3)
    assert model.clip_tower.frozen_runner.max_graphs == 3 and model.vision_branch.backbone_runner.max_graphs == 3
    batch = make_batch(tokenizer)
    with torch.no_grad():  # on the CPU the runners fall back to the eager encoders
        with_runners = model(**batch)["loss"]
    use_frozen_encoder_graphs(model, False)
    assert model.clip_tower.frozen_runner is None and model.vision_branch.backbone_runner is None
    with torch.no_grad():
        assert torch.equal(model(**batch)["loss"], with_runners)
    model.vision_branch.cfg.freeze_backbone = False
    use_frozen_encoder_graphs(model)
    assert model.vision_branch.backbone_runner is None and model.clip_tower.frozen_runner is not None


@cuda
def test_replay_equals_the_eager_function_and_outputs_are_independent_copies():
    encoder = small_encoder("cuda")
    runner = FrozenGraphRunner(two_outputs(encoder), encoder)
    x1, x2 = torch.randn(5, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    with torch.no_grad():
        first = runner(x1)
        second = runner(x2)
        assert runner.captures == 1 and len(runner) == 1
        assert torch.equal(first[0], encoder(x1)) and torch.equal(first[1], encoder[0](x1))
        assert torch.equal(second[0], encoder(x2))  # the second call did not overwrite the first's outputs


@cuda
def test_one_graph_per_shape_least_recently_used_dropped_and_grad_mode_runs_eagerly():
    encoder = small_encoder("cuda")
    runner = FrozenGraphRunner(two_outputs(encoder), encoder, max_graphs=2)
    with torch.no_grad():
        for rows in (2, 3, 2, 4):  # 2 is reused, then 3 (least recent) is dropped for 4
            x = torch.randn(rows, 8, device="cuda")
            assert torch.equal(runner(x)[0], encoder(x))
        assert runner.captures == 3 and len(runner) == 2
        runner(torch.randn(3, 8, device="cuda"))
        assert runner.captures == 4
    x = torch.randn(2, 8, device="cuda")
    assert torch.equal(runner(x)[0], encoder(x)) and runner.captures == 4  # grad enabled: eager


@cuda
def test_in_place_weight_updates_are_seen_and_moved_weights_are_recaptured():
    encoder = small_encoder("cuda")
    runner = FrozenGraphRunner(two_outputs(encoder), encoder)
    x = torch.randn(4, 8, device="cuda")
    with torch.no_grad():
        runner(x)
        encoder[2].weight.mul_(2.0)  # same storage: the captured graph reads the new values
        assert torch.equal(runner(x)[0], encoder(x)) and runner.captures == 1
        encoder.to(torch.float64)  # new storage: a graph reading the old one would be stale
        x64 = x.double()
        assert torch.equal(runner(x64)[0], encoder(x64)) and runner.captures == 2


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_training_step_with_graphed_encoders_equals_the_eager_one(tokenizer, dtype):
    model = fresh_model(tokenizer, dtype)
    for module in model.modules():  # the fusion layers' drop-path would make every step differ
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    model.set_gradient_checkpointing(0)
    batch = to_cuda(make_batch(tokenizer), dtype)
    with torch.no_grad():
        clip_eager = model.clip_tower(batch["images_clip"])
        swin_eager = model.vision_branch.forward_backbone(batch["images_dino"])
    # Same outputs, same layouts: the rest of the step agrees to rounding (measured on an H200: losses to
    # 1e-6; gradients within a few times the spread of two eager steps, whose atomics differ, or one bf16
    # rounding step, hence gradients are compared in fp32 only).
    eager = [run(model, batch) for _ in range(2)]
    use_frozen_encoder_graphs(model)
    for _ in range(2):  # capture, then replay
        with torch.no_grad():
            clip = model.clip_tower(batch["images_clip"])
            swin = model.vision_branch.forward_backbone(batch["images_dino"])
        for got, want in zip([clip.image_tokens, *clip.region_levels, *swin.feature_maps, *swin.masks,
                              *swin.positions], [clip_eager.image_tokens, *clip_eager.region_levels,
                                                 *swin_eager.feature_maps, *swin_eager.masks, *swin_eager.positions]):
            assert torch.equal(got, want) and got.stride() == want.stride()
        losses, grads = run(model, batch)
        assert losses.keys() == eager[0][0].keys() and grads.keys() == eager[0][1].keys()
        for key, value in losses.items():
            spread = abs(eager[1][0][key] - eager[0][0][key])
            assert abs(value - eager[0][0][key]) <= 4 * spread + 1e-5 * abs(eager[0][0][key]), (key, value, eager)
        if dtype == torch.float32:
            for name, grad in grads.items():
                spread = (eager[1][1][name] - eager[0][1][name]).abs().max().item()
                error = (grad - eager[0][1][name]).abs().max().item()
                assert error <= 4 * spread + 1e-4 * eager[0][1][name].abs().max().item(), (name, error, spread)
    # CLIP sees both images; the backbone all of them here and only the grounding row's in the step.
    assert model.clip_tower.frozen_runner.captures == 1 and model.vision_branch.backbone_runner.captures == 2
