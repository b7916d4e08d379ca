"""The grounding step's vision part replayed from CUDA graphs (chatterbox.accel.grounding_graphs).

On the CPU its padded computation runs eagerly (``graphs=False``) and must give the eager path's losses
and gradients; on a GPU (skipped without one; run by bench/gpu_bench_train.sh) the captured graphs must
give the same as both, across padded shapes, gradient accumulation and repeated replays."""
from __future__ import annotations

import pytest
import torch

from chatterbox.accel import compile_layers, use_grounding_loss_graphs
from chatterbox.accel.grounding_graphs import GroundingLossGraphs, padded_size, query_chunks, target_slots
from chatterbox.model.lora import parameter_group
from tests.test_model_chatterbox import CLIP_SIZE, build_tiny, make_batch



def _kernel_missing() -> str | None:
    from model.GroundingDINO.ms_deform_attn import kernel_status, uses_cuda_kernel

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if uses_cuda_kernel("cuda"):
        return None
    return f"the deformable-attention kernel is not in use: {kernel_status('cuda')}"


cuda = pytest.mark.skipif(_kernel_missing() is not None, reason=str(_kernel_missing()))

# Three rows with 2, 1 and 1 `[VG]`: four queries, with 1, 3, 2 and 1 target boxes.
TEXTS = ("<image>\n Where are the dog[VG] and the cats[VG]? Here.</s>",
         "<image>\n Where is the ball?[VG] On the grass.</s>",
         "<image>\n Find the kite.[VG]</s>")
TARGETS = [[[[0.5, 0.5, 0.2, 0.3]], [[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2], [0.2, 0.8, 0.1, 0.1]]],
           [[[0.4, 0.6, 0.3, 0.2], [0.6, 0.4, 0.2, 0.2]]],
           [[[0.5, 0.3, 0.4, 0.2]]]]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def grounding_batch(tokenizer, rows=(0, 1, 2)) -> dict:
    batch = make_batch(tokenizer, texts=tuple(TEXTS[r] for r in rows))
    g = torch.Generator().manual_seed(3)
    batch.update(images_clip=torch.randn(len(rows), 3, CLIP_SIZE, CLIP_SIZE, generator=g),
                 images_dino=torch.randn(len(rows), 3, 128, 128, generator=g),
                 offset=torch.arange(len(rows) + 1), image_sizes_hw=torch.tensor([[480, 640]] * len(rows)),
                 region_boxes_xyxy_clip_norm=[torch.zeros(0, 4)] * len(rows),
                 grounding_targets_cxcywh_norm=[[torch.tensor(t) for t in TARGETS[r]] for r in rows],
                 task=["grounding"] * len(rows), sample_ids=[f"gnd.json#{r}" for r in rows])
    return batch


def fresh_model(tokenizer, device="cpu", dtype=torch.float32):
    """Tiny model in eval mode (no dropout or drop-path, so two paths can be compared) with grad on."""
    model = build_tiny(tokenizer)
    with torch.no_grad():  # LoRA B starts at zero, which would hide gradients of A
        for index, (name, param) in enumerate(model.named_parameters()):
            if ".lora_B." in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(index))
    return model.to(device, dtype).eval()


def step(model, batch, accumulate: int = 1) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        out = model(**batch)
        out["loss"].backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float() for k, v in out.items()}, grads


def assert_same_step(got, want, rtol: float, atol: float) -> None:
    (losses, grads), (ref_losses, ref_grads) = got, want
    assert set(losses) == set(ref_losses)
    for name in ref_losses:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=rtol, atol=atol, msg=name)
    assert set(grads) == set(ref_grads)
    assert any(name.startswith("vision_branch.") for name in grads)
    for name, want in ref_grads.items():  # relative L2 distance: a padded batch may round differently
        assert torch.isfinite(grads[name]).all(), name
        assert (grads[name] - want).norm() <= rtol * want.norm() + atol, name


def to_device(batch: dict, device) -> dict:
    from chatterbox.train.loop import move_batch

    return move_batch(batch, torch.device(device), torch.float32)


# ---------------------------------------------------------------------------------------------------
def test_padding_sizes():
    assert [padded_size(q, 4) for q in (1, 4, 5, 9)] == [4, 4, 8, 12]
    assert [target_slots(k) for k in (0, 1, 2, 3, 4, 5, 8)] == [1, 1, 2, 4, 4, 8, 8]
    assert query_chunks(4, 8, 4) == [(0, 4, 4)]
    assert query_chunks(19, 8, 4) == [(0, 8, 8), (8, 8, 8), (16, 3, 4)]
    assert query_chunks(6, 8, 3) == [(0, 6, 6)]
    assert query_chunks(7, 8, 6) == [(0, 7, 8)]  # never past the chunk size
    assert query_chunks(4, 1, 1) == [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1)]


@pytest.mark.parametrize("query_chunk,query_multiple", [(8, 1), (8, 4), (8, 6), (1, 1), (3, 2)])
def test_chunked_step_gives_the_eager_losses_and_gradients(tokenizer, query_chunk, query_multiple):
    """Four queries in one chunk, or in one to four chunks whose losses and gradients add up."""
    model = fresh_model(tokenizer)
    batch = grounding_batch(tokenizer)
    want = step(model, batch, accumulate=2)
    use_grounding_loss_graphs(model, query_chunk=query_chunk, query_multiple=query_multiple, graphs=False)
    got = step(model, batch, accumulate=2)  # gradients accumulate into .grad as the eager ones do
    assert len(model.grounding_loss_runner) == len({(padded, target_slots(max(
        [1, 3, 2, 1][start:start + real]))) for start, real, padded in query_chunks(4, query_chunk, query_multiple)})
    # Chunks add a query's gradient in another order: the input projections' biases, whose gradients are
    # sums of cancelling terms (~1e-6 before a GroupNorm), differ by ~1e-6; atol 2e-5 covers them, rtol the rest.
    assert_same_step(got, want, rtol=1e-4, atol=2e-5)


def test_chunks_keep_upstreams_local_normalisation(tokenizer):
    """ce_normalization: local_matches divides by the rank's matched pairs, not a chunk's."""
    model = fresh_model(tokenizer)
    model.grounding_criterion.ce_normalization = "local_matches"
    batch = grounding_batch(tokenizer)
    want = step(model, batch)
    use_grounding_loss_graphs(model, query_chunk=1, graphs=False)
    assert_same_step(step(model, batch), want, rtol=1e-4, atol=2e-5)


def test_a_loss_gradient_scales_the_chunks_gradients(tokenizer):
    """The chunks' backward ran for a loss gradient of 1; the model's backward multiplies the real one in
    (gradient accumulation and loss scaling divide or multiply the loss)."""
    model = fresh_model(tokenizer)
    batch = grounding_batch(tokenizer)
    model.zero_grad(set_to_none=True)
    (model(**batch)["loss"] * 0.25).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    use_grounding_loss_graphs(model, query_chunk=2, graphs=False)
    model.zero_grad(set_to_none=True)
    (model(**batch)["loss"] * 0.25).backward()
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-5, msg=name)


def test_shapes_that_pad_alike_share_one_step(tokenizer):
    model = fresh_model(tokenizer)
    use_grounding_loss_graphs(model, query_chunk=8, query_multiple=4, max_graphs=2, graphs=False)
    runner = model.grounding_loss_runner
    # (queries, most boxes of one query): (4, 3), (4, 3), (3, 2), (3, 1) -> padded (4, 4), (4, 4), (4, 2), (4, 1)
    for rows in [(0, 1, 2), (0, 2, 2), (1, 2, 2), (2, 2, 2)]:
        step(model, grounding_batch(tokenizer, rows))
    assert [key[:2] for key in runner._steps] == [(4, 2), (4, 1)]  # (4, 4) was used least recently


def test_forwards_may_run_before_their_backwards(tokenizer):
    """Nothing of a forward pass waits in the graphs' memory for its backward: two forwards, then both
    backwards in either order, give the sum of the two steps' gradients."""
    model = fresh_model(tokenizer)
    batches = [grounding_batch(tokenizer), grounding_batch(tokenizer, (1, 2))]
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch)["loss"].backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    use_grounding_loss_graphs(model, query_chunk=2, graphs=False)
    model.zero_grad(set_to_none=True)
    first, second = (model(**batch)["loss"] for batch in batches)
    second.backward()
    first.backward()
    assert set(want) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=2e-5, msg=name)


def test_where_the_runner_declines_the_eager_path_runs(tokenizer):
    model = fresh_model(tokenizer)
    use_grounding_loss_graphs(model, graphs=False)
    runner = model.grounding_loss_runner
    queries = torch.zeros(2, model.vision_branch.cfg.hidden_dim)
    assert runner.accepts(queries, [1, 3])
    assert not runner.accepts(queries, [1, 9])  # more boxes than the device matcher takes
    with torch.no_grad():
        assert not runner.accepts(queries, [1, 3])
    model.grounding_criterion.matcher.solver = "scipy"
    assert not runner.accepts(queries, [1, 3])
    model.grounding_criterion.matcher.solver = "auto"
    model.vision_branch.train()
    model.vision_branch.cfg.use_transformer_ckpt = True
    assert not runner.accepts(queries, [1, 3])
    model.vision_branch.cfg.use_transformer_ckpt = False
    assert runner.accepts(queries, [1, 3])
    assert not GroundingLossGraphs(model.vision_branch, model.grounding_criterion).accepts(queries, [1])  # CPU
    with pytest.raises(ValueError, match="query_chunk"):
        GroundingLossGraphs(model.vision_branch, model.grounding_criterion, query_chunk=0)
    half = torch.zeros(2, model.vision_branch.cfg.hidden_dim, dtype=torch.float16)
    assert not runner.accepts(half, [1, 3])  # fp16: its loss scale belongs inside the backward


def test_bad_inputs_name_what_is_wrong(tokenizer):
    model = fresh_model(tokenizer)
    runner = GroundingLossGraphs(model.vision_branch, model.grounding_criterion, graphs=False)
    features = model.vision_branch.forward_backbone(torch.randn(2, 3, 128, 128))
    queries = torch.randn(2, model.vision_branch.cfg.hidden_dim, requires_grad=True)
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.2]])] * 2
    with pytest.raises(ValueError, match="out of range for 2 images"):
        runner(features, queries, torch.tensor([0, 2]), boxes)
    with pytest.raises(ValueError, match="on the host"):
        runner(features, queries, torch.tensor([0.0, 1.0]), boxes)
    with pytest.raises(ValueError, match="1 target sets for 2 queries"):
        runner(features, queries, torch.tensor([0, 1]), boxes[:1])
    with pytest.raises(ValueError, match=r"target_boxes\[1\] must be \[k,4\]"):
        runner(features, queries, torch.tensor([0, 1]), [boxes[0], torch.zeros(4)])
    with pytest.raises(ValueError, match="queries must be"):
        runner(features, queries[:, :3], torch.tensor([0, 1]), boxes)
    losses = runner(features, queries, torch.tensor([1, 1]), boxes)
    assert torch.isfinite(losses["loss"]) and "loss_giou_interm" in losses
    with torch.no_grad():  # declined: the model runs its eager path
        assert runner(features, queries, torch.tensor([1, 1]), boxes) is None


# ---------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("query_chunk", [8, 2])
def test_graphs_replay_the_eager_step_on_the_gpu(tokenizer, query_chunk):
    model = fresh_model(tokenizer, "cuda")
    batches = {rows: to_device(grounding_batch(tokenizer, rows), "cuda") for rows in [(0, 1, 2), (1, 2), (0,)]}
    eager = {rows: step(model, batch, accumulate=2) for rows, batch in batches.items()}
    use_grounding_loss_graphs(model, query_chunk=query_chunk, query_multiple=4, graphs=False)
    padded = {rows: step(model, batch, accumulate=2) for rows, batch in batches.items()}
    use_grounding_loss_graphs(model, query_chunk=query_chunk, query_multiple=4)
    runner = model.grounding_loss_runner
    # The deformable-attention kernel's backward accumulates with atomics: gradients that are sums of
    # cancelling terms (the input projections' biases, ~1e-6 before a GroupNorm) differ by ~1e-5 between
    # the graphed and eager runs of a step, on a different bias from run to run. atol 1e-4 covers those;
    # rtol still holds every other gradient.
    for _ in range(2):  # captured on the first round, replayed on the second
        for rows, batch in batches.items():
            got = step(model, batch, accumulate=2)
            assert_same_step(got, padded[rows], rtol=1e-4, atol=1e-4)
            assert_same_step(got, eager[rows], rtol=1e-2, atol=1e-4)  # TF32 convolutions on other shapes
    # (padded queries, target slots) by image layout; chunks of 8: (4, 4) on 3 images, (4, 2) on 2, (4, 4) on 1;
    # of 2: (2, 4) and (2, 2) on 3 images, (2, 2) on 2, (2, 4) on 1
    assert runner.captures == len(runner) == {8: 3, 2: 4}[query_chunk]


@cuda
def test_graphs_under_torch_compile_and_bf16(tokenizer):
    """The training configuration: compiled vision layers inside the captured graphs, bf16 weights."""
    model = fresh_model(tokenizer, "cuda", torch.bfloat16)
    compile_layers(model, language=False)
    batch = to_device(grounding_batch(tokenizer), "cuda")
    batch = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    want_losses, want_grads = step(model, batch)
    use_grounding_loss_graphs(model)
    for _ in range(3):
        losses, grads = step(model, batch)
        assert torch.isfinite(losses["loss"])
        assert losses["loss"].item() == pytest.approx(want_losses["loss"].item(), rel=2e-2)
        # Relative L2 distance per parameter group, as in test_model_gpu: single tensors can be pure bf16
        # rounding noise (a convolution bias before GroupNorm has a true gradient of 0).
        diff, norm = {}, {}
        for name, grad in want_grads.items():
            assert torch.isfinite(grads[name]).all(), name
            group = parameter_group(name)
            diff[group] = diff.get(group, 0.0) + float((grads[name] - grad).pow(2).sum())
            norm[group] = norm.get(group, 0.0) + float(grad.pow(2).sum())
        assert {"vision_branch", "query_head", "lora"} <= set(diff)
        for group in diff:
            assert diff[group] ** 0.5 <= 5e-2 * norm[group] ** 0.5 + 1e-8, group
    assert model.grounding_loss_runner.captures == 2  # two chunks of 2 queries: 4 and 2 target slots
