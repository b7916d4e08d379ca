"""The tiny model on a CUDA GPU: bf16 and fp16 forward/backward with gradient checkpointing (skipped
without a GPU; run by bench/gpu_bench_train.sh)."""
from __future__ import annotations

import pytest
import torch

from chatterbox.model.lora import parameter_group
from tests.test_model_chatterbox import build_tiny, make_batch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def to_cuda(batch: dict, dtype: torch.dtype) -> dict:
    from chatterbox.train.loop import move_batch

    return move_batch(batch, torch.device("cuda"), dtype)


def fresh_model(tokenizer, dtype: torch.dtype):
    model = build_tiny(tokenizer, zero_lm_loss_on_grounding=False)
    model.cfg.language.lora_dropout = 0.0
    for module in model.modules():  # dropout and the fusion layers' drop-path off: runs must be comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            if ".lora_B." in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(index))
    return model.to("cuda", dtype).train()


def run(model, batch) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in out.items() if v.dim() == 0}, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_training_step_on_cuda(tokenizer, dtype):
    batch_cpu = make_batch(tokenizer)
    reference, _ = run(fresh_model(tokenizer, torch.float32), to_cuda(batch_cpu, torch.float32))
    model = fresh_model(tokenizer, dtype)
    assert model.causal_lm.model.rotary_emb.inv_freq.dtype == torch.float32
    batch = to_cuda(batch_cpu, dtype)
    model.set_gradient_checkpointing(0)
    plain, plain_grads = run(model, batch)
    assert model.set_gradient_checkpointing(-1) == 2
    checkpointed, grads = run(model, batch)
    for key in ("loss", "lm_loss", "grounding_loss"):
        assert torch.isfinite(torch.tensor(checkpointed[key])), key
    assert checkpointed["lm_loss"] == pytest.approx(reference["lm_loss"], rel=3e-2)
    assert checkpointed["lm_loss"] == pytest.approx(plain["lm_loss"], rel=1e-3)
    # Per group, relative L2 distance: single entries can be pure rounding noise (a conv bias before
    # GroupNorm has a true gradient of 0), and atomics in the vision backward are not deterministic.
    reached, diff, norm = set(), {}, {}
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        group = parameter_group(name)
        diff[group] = diff.get(group, 0.0) + float((grad - plain_grads[name]).pow(2).sum())
        norm[group] = norm.get(group, 0.0) + float(plain_grads[name].pow(2).sum())
        if grad.abs().sum() > 0:
            reached.add(group)
    for group in diff:
        assert diff[group] ** 0.5 <= 5e-2 * norm[group] ** 0.5 + 1e-8, group
    assert {"lora", "embed_tokens", "lm_head", "region_encoder", "query_head", "vision_branch"} <= reached
