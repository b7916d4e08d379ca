"""A model moved to float64 computes in float64 throughout: no float32 (or narrower) tensor appears in the
forward, the loss or the backward of a training step, nor in box prediction."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from chatterbox.tokens import expand_image_placeholder
from test_model_chatterbox import build_tiny, make_batch

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix).resolve()
LLAMA_STEP = str(REPO / "chatterbox" / "model" / "fast_decode.py")
NARROW = {torch.float32, torch.float16, torch.bfloat16}


class NarrowFloatProbe(TorchFunctionMode):
    """Records, for every torch call whose output holds a float32/float16/bfloat16 tensor, the repository
    source line that made it. Left out: empty tensors, and calls made inside transformers' LLaMA or inside
    our fused decode step, which reproduces LLaMA's step exactly: their RMSNorm and rotary embedding compute
    in float32 by design (the language model is transformers', not part of this check)."""

    def __init__(self):
        super().__init__()
        self.sites: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        narrow = [t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.dtype in NARROW and t.numel()]
        stack = traceback.extract_stack()[:-1] if narrow else []
        if narrow and not any(f"{os.sep}transformers{os.sep}" in frame.filename or frame.filename == LLAMA_STEP
                              for frame in stack):
            for frame in reversed(stack):
                path = Path(frame.filename).resolve()
                if path.is_file() and path.is_relative_to(REPO) and not path.is_relative_to(REPO / "tests") \
                        and not path.is_relative_to(VENV):
                    self.sites.setdefault(f"{path.relative_to(REPO)}:{frame.lineno}",
                                          f"{getattr(func, '__name__', func)} -> {narrow[0]}: {frame.line}")
                    break
        return out


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def float64_batch(tokenizer) -> dict:
    batch = make_batch(tokenizer)
    for key in ("images_clip", "images_dino"):
        batch[key] = batch[key].double()
    batch["region_boxes_xyxy_clip_norm"] = [b.double() for b in batch["region_boxes_xyxy_clip_norm"]]
    batch["grounding_targets_cxcywh_norm"] = [[t.double() for t in q] for q in batch["grounding_targets_cxcywh_norm"]]
    return batch


def assert_float64_only(probe: NarrowFloatProbe) -> None:
    assert not probe.sites, "float32 computed in a float64 model at:\n" + "\n".join(
        f"  {site}  ({what})" for site, what in probe.sites.items())


@pytest.mark.parametrize("solver", ["scipy", "device"])
def test_a_float64_training_step_computes_nothing_in_float32(tokenizer, solver):
    """Forward, every loss term and the backward; both assignment paths of the criterion (scipy on the host,
    the batched solver on the device)."""
    model = build_tiny(tokenizer).train().to(torch.float64)
    model.grounding_criterion.matcher.solver = solver
    probe = NarrowFloatProbe()
    with probe:
        out = model(**float64_batch(tokenizer))
        out["loss"].backward()
    assert_float64_only(probe)
    assert all(value.dtype == torch.float64 for value in out.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float64 for g in grads)


def test_float64_generation_predicts_boxes_in_float64(tokenizer):
    model = build_tiny(tokenizer).eval().to(torch.float64)
    batch = float64_batch(tokenizer)
    enc = tokenizer([expand_image_placeholder("<image>\n What is it <bbox>? Where is it?[VG] ASSISTANT:")],
                    return_tensors="pt")
    probe = NarrowFloatProbe()
    with probe:
        result = model.generate(enc.input_ids, enc.attention_mask, images_clip=batch["images_clip"][:1],
                                images_dino=batch["images_dino"][:1], image_sizes_hw=batch["image_sizes_hw"][:1],
                                region_boxes_xyxy_clip_norm=batch["region_boxes_xyxy_clip_norm"][:1],
                                max_new_tokens=3)[0]
    assert_float64_only(probe)
    assert result.boxes_xyxy_abs.shape == (1, 4) and result.boxes_xyxy_abs.dtype == torch.float64
