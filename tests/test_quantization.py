"""Low-memory inference (chatterbox.model.quantization): the tiny model's LLM in 8-bit and 4-bit with
bitsandbytes on the CPU. The memory and speed on a GPU are measured in docs/chat.md, not here."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from torch import nn

from chatterbox.config import load_config
from chatterbox.model.chatterbox import ChatterBox
from chatterbox.model.quantization import QUANTIZATION_MODES, bnb_config, quantize_language_model
from chatterbox.model.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]
LINEARS_PER_DECODER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ChatterBox.build(load_config("tiny_stage1", []).model, verbose=False).eval()


def _logits(model, input_ids):
    with torch.no_grad():
        return model.causal_lm(input_ids=input_ids).logits


@pytest.mark.parametrize("mode, layer_type, storage, max_relative_error", [
    ("8bit", bnb.nn.Linear8bitLt, torch.int8, 0.05),
    ("4bit", bnb.nn.Linear4bit, torch.uint8, 0.5),
])
def test_the_decoder_layers_linears_are_quantised_and_the_logits_stay_close(tiny_model, mode, layer_type, storage,
                                                                            max_relative_error):
    model = copy.deepcopy(tiny_model)
    replaced = quantize_language_model(model, mode, "cpu")
    layers = model.causal_lm.model.layers
    assert replaced == LINEARS_PER_DECODER_LAYER * len(layers)
    for layer in layers:
        quantised = [m for m in layer.modules() if isinstance(m, layer_type)]
        assert len(quantised) == LINEARS_PER_DECODER_LAYER
        assert all(m.weight.dtype == storage and not m.weight.requires_grad for m in quantised)
        # LoRA wraps the frozen base of q and v: the base is quantised, LoRA's own matrices are not
        q_proj = layer.self_attn.q_proj
        assert isinstance(q_proj.base_layer, layer_type) and type(q_proj.lora_A["default"]) is nn.Linear
    assert type(model.causal_lm.lm_head) is nn.Linear and model.causal_lm.lm_head.weight.dtype == torch.float32
    assert model.quantization == mode

    input_ids = torch.randint(5, 900, (2, 40), generator=torch.Generator().manual_seed(0))
    full, low = _logits(tiny_model, input_ids), _logits(model, input_ids)
    assert ((full - low).norm() / full.norm()).item() < max_relative_error


def test_a_quantised_model_answers_with_boxes_and_is_never_saved(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    quantize_language_model(model, "8bit", "cpu")
    chat = model.chat_session(Image.new("RGB", (300, 200), (128, 128, 128)))
    reply = chat.ask("Where is the red circle? [VG]", max_new_tokens=3)
    assert reply.boxes_xyxy_abs.shape == (1, 4) and torch.isfinite(reply.boxes_xyxy_abs).all()
    with pytest.raises(WeightsError, match="quantised"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_per_matmul_int8_cast_notice_is_dropped_and_other_bitsandbytes_warnings_kept(tiny_model, caplog):
    """bitsandbytes (0.50) logs "MatMul8bitLt: inputs will be cast from <dtype> to float16" on every int8 matmul
    of a bf16 model on a GPU (the CPU path does not reach it, so the record is logged here by hand)."""
    quantize_language_model(copy.deepcopy(tiny_model), "8bit", "cpu")
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["something else"]


def test_an_export_loads_quantised(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "export")
    model = ChatterBox.from_pretrained(tmp_path / "export", quantization="4bit")
    assert model.quantization == "4bit"
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == \
        LINEARS_PER_DECODER_LAYER * len(model.causal_lm.model.layers)
    # everything that is not the LLM's decoder layers holds the export's weights unchanged
    ours = dict(tiny_model.named_parameters())
    for name, param in model.named_parameters():
        if ".layers." not in name:
            torch.testing.assert_close(param, ours[name], rtol=0, atol=0, msg=name)


def test_unknown_modes_and_a_missing_bitsandbytes_are_clear_errors(tiny_model, monkeypatch):
    assert QUANTIZATION_MODES == ("none", "8bit", "4bit")
    with pytest.raises(ValueError, match="must be one of 8bit, 4bit, got '3bit'"):
        bnb_config("3bit", torch.bfloat16)
    assert bnb_config("4bit", torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="needs bitsandbytes"):
        quantize_language_model(copy.deepcopy(tiny_model), "8bit", "cpu")


def test_the_evaluation_command_runs_quantised(tmp_path):
    from chatterbox.data.synthetic import write_corpus

    root = tmp_path / "data"
    write_corpus(root, num_images=12, seed=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "evaluation" / "coco_grounding.py"), "--config", "tiny_stage1",
               "--set", f"data.paths.coco2017_dir={root / 'MSCOCO2017'}", "--set", "eval.max_new_tokens=3",
               "--limit", "2", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    bad = subprocess.run([*command, "--quantization", "3bit"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: '3bit'" in bad.stderr
    run = subprocess.run([*command, "--quantization", "8bit"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["num_samples"] == 2
    # a quantised run's predictions are not resumed as a full-precision run's
    fingerprint = json.loads((tmp_path / "out" / "predictions.jsonl.run.json").read_text())
    assert fingerprint["options"]["quantization"] == "8bit"
