"""ChatterBox on the tiny preset: forward/backward, token splicing, gradients, generation, export."""
from __future__ import annotations

import pytest
import torch

from chatterbox.conversation import IGNORE_INDEX
from chatterbox.model.chatterbox import ChatterBox
from chatterbox.model.config import PARAMETER_GROUPS
from chatterbox.model.lora import parameter_group
from chatterbox.tokens import expand_image_placeholder
from tests.conftest import tiny_upstream_policy

REGION_TEXT = "<image>\n What is it <bbox>? It is a dog.</s>"
GROUNDING_TEXT = "<image>\n Where is the dog?[VG] It is on the left.</s>"
CLIP_SIZE = tiny_upstream_policy().clip.image_size


def build_tiny(tokenizer, **overrides) -> ChatterBox:
    cfg = tiny_upstream_policy()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False)


def make_batch(tokenizer, texts=(REGION_TEXT, GROUNDING_TEXT)) -> dict:
    enc = tokenizer([expand_image_placeholder(t) for t in texts], padding=True, return_tensors="pt")
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = IGNORE_INDEX
    labels[:, :262] = IGNORE_INDEX  # BOS + image block + question: only the answers are supervised
    g = torch.Generator().manual_seed(1)
    return dict(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels,
        images_clip=torch.randn(2, 3, CLIP_SIZE, CLIP_SIZE, generator=g),
        images_dino=torch.randn(2, 3, 128, 128, generator=g),
        offset=torch.tensor([0, 1, 2]), image_sizes_hw=torch.tensor([[480, 640], [300, 400]]),
        region_boxes_xyxy_clip_norm=[torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.zeros(0, 4)],
        grounding_targets_cxcywh_norm=[[], [torch.tensor([[0.5, 0.5, 0.2, 0.3]])]],
        task=["referring", "grounding"], sample_ids=["refs.json#0", "gnd.json#7"],
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny(tokenizer).eval()


@pytest.mark.parametrize("pretrained_frozen", [True, False], ids=["upstream_policy", "random_init_unfrozen"])
def test_forward_backward_gradient_policy(tokenizer, pretrained_frozen):
    """Upstream's policy (spec §1.8), and the tiny preset's: CLIP and the base LLM trained too."""
    cfg = tiny_upstream_policy()
    cfg.zero_lm_loss_on_grounding = False
    cfg.clip.freeze = cfg.language.freeze_base = pretrained_frozen
    torch.manual_seed(0)
    model = ChatterBox.build(cfg, tokenizer=tokenizer, verbose=False).train()
    with torch.no_grad():  # LoRA B starts at zero, which would hide gradients of A
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.02)
    out = model(**make_batch(tokenizer))
    for key in ("lm_loss", "grounding_loss", "loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_interm"):
        assert torch.isfinite(out[key]), key
    assert out["lm_loss"] > 0 and out["grounding_loss"] > 0
    torch.testing.assert_close(out["loss"], out["lm_loss"] + out["grounding_loss"])
    out["loss"].backward()
    reached: dict[str, bool] = {}
    for name, param in model.named_parameters():
        hit = param.grad is not None and bool(param.grad.abs().sum() > 0)
        group = parameter_group(name)
        reached[group] = reached.get(group, False) or hit
        if not param.requires_grad:
            assert param.grad is None, name
    assert set(reached) == set(PARAMETER_GROUPS)  # train.lr_scale can name every parameter, and only these
    for group in ("lora", "embed_tokens", "lm_head", "region_encoder", "query_head", "vision_branch"):
        assert reached[group], f"no gradient reached {group}"
    for group in ("clip_tower", "llm_base", "mm_projector"):
        assert reached[group] != pretrained_frozen, f"{group}: frozen={pretrained_frozen} not honoured"
    assert not reached["vision_backbone"], "vision_backbone must stay frozen"


def test_zero_lm_loss_on_grounding_batches(tokenizer, model):
    batch = make_batch(tokenizer)
    with torch.no_grad():
        zeroed = model(**batch)
        model.cfg.zero_lm_loss_on_grounding = False
        try:
            kept = model(**batch)
        finally:
            model.cfg.zero_lm_loss_on_grounding = True
        referring_only = model(**{**batch, "grounding_targets_cxcywh_norm": [[], []], "images_dino": None})
    assert zeroed["lm_loss"] == 0 and kept["lm_loss"] > 0
    assert referring_only["lm_loss"] > 0 and referring_only["grounding_loss"] == 0
    assert torch.equal(zeroed["grounding_loss"], kept["grounding_loss"])


def test_a_zeroed_lm_loss_is_not_computed_and_leaves_the_gradients_of_multiplying_it_by_zero(tokenizer):
    model = build_tiny(tokenizer).eval()  # eval: no dropout, so both backward passes see the same graph
    batch = make_batch(tokenizer)
    out = model(**batch)
    assert out["lm_loss"].dtype == torch.float32 and out["lm_loss"] == 0 and not out["lm_loss"].requires_grad
    out["loss"].backward()
    skipped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.cfg.zero_lm_loss_on_grounding = False  # upstream's way: compute it, then multiply by 0
    out = model(**batch)
    (out["lm_loss"] * 0.0 + out["grounding_loss"]).backward()
    multiplied = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    lm_head = [n for n in multiplied if "lm_head" in n]
    assert lm_head and all(n not in skipped and not multiplied[n].any() for n in lm_head)
    assert set(multiplied) - set(lm_head) == set(skipped)
    for name, grad in skipped.items():
        torch.testing.assert_close(grad, multiplied[name], msg=name)


def test_lm_loss_is_the_mean_over_supervised_tokens_and_zero_without_any(tokenizer, model):
    hidden = torch.randn(2, 9, model.causal_lm.config.hidden_size, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :5] = IGNORE_INDEX
    logits = model.causal_lm.lm_head(hidden[:, :-1]).float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model._lm_loss(hidden, labels), expected)
    nothing = model._lm_loss(hidden, torch.full_like(labels, IGNORE_INDEX))
    assert nothing.item() == 0.0
    nothing.backward()  # a zero that keeps the graph: no NaN gradients
    assert torch.isfinite(hidden.grad).all()


def test_image_and_region_embeddings_land_at_their_tokens(tokenizer, model):
    batch = make_batch(tokenizer)
    ids = model.token_ids
    with torch.no_grad():
        embeds = model.build_inputs_embeds(batch["input_ids"], batch["images_clip"], batch["offset"],
                                           batch["region_boxes_xyxy_clip_norm"], batch["sample_ids"])
        plain = model.causal_lm.get_input_embeddings()(batch["input_ids"])
        clip = model.clip_tower(batch["images_clip"])
        image_embeds = model.causal_lm.model.mm_projector(clip.image_tokens)
        region = model.region_encoder(clip.region_levels, batch["region_boxes_xyxy_clip_norm"][0], torch.tensor([0]))
    for row in range(2):
        patch_pos = (batch["input_ids"][row] == ids.im_patch).nonzero().squeeze(1)
        assert patch_pos.tolist() == list(range(2, 258))  # BOS, <im_start>, then 256 patches
        torch.testing.assert_close(embeds[row, patch_pos], image_embeds[row])
    bbox_pos = (batch["input_ids"][0] == ids.bbox).nonzero().squeeze(1)
    assert bbox_pos.numel() == 1
    torch.testing.assert_close(embeds[0, bbox_pos], region)
    other = (batch["input_ids"] != ids.im_patch) & (batch["input_ids"] != ids.bbox)
    assert torch.equal(embeds[other], plain[other])


def test_count_mismatches_name_the_sample(tokenizer, model):
    batch = make_batch(tokenizer)
    with pytest.raises(ValueError, match=r"refs\.json#0.*1 <bbox> tokens but 2 region boxes"):
        model(**{**batch, "region_boxes_xyxy_clip_norm": [torch.rand(2, 4), torch.zeros(0, 4)]})
    with pytest.raises(ValueError, match=r"gnd\.json#7.*1 \[VG\] tokens but 2 grounding targets"):
        model(**{**batch, "grounding_targets_cxcywh_norm": [[], [torch.rand(1, 4), torch.rand(1, 4)]]})
    truncated = {**batch, "input_ids": batch["input_ids"][:, :200], "attention_mask": batch["attention_mask"][:, :200],
                 "labels": batch["labels"][:, :200]}
    with pytest.raises(ValueError, match=r"refs\.json#0.*<im_start>"):
        model(**truncated)


def test_every_vg_yields_a_query(tokenizer, model):
    text = "<image>\n Where is the dog?[VG] And the cat?[VG] Both are here.</s>"
    batch = make_batch(tokenizer, texts=(text, text))
    targets = [[torch.tensor([[0.2, 0.2, 0.1, 0.1]]), torch.tensor([[0.7, 0.7, 0.2, 0.2]])]] * 2
    seen = {}
    original = model.vision_branch.forward_enc_dec

    def spy(features, queries, query_image_index):
        seen["queries"], seen["index"] = queries, query_image_index
        return original(features, queries, query_image_index)

    model.vision_branch.forward_enc_dec = spy
    try:
        with torch.no_grad():
            model(**{**batch, "region_boxes_xyxy_clip_norm": None, "grounding_targets_cxcywh_norm": targets})
    finally:
        del model.vision_branch.forward_enc_dec
    assert seen["queries"].shape == (4, model.vision_branch.cfg.hidden_dim)
    assert seen["index"].tolist() == [0, 0, 1, 1]


def _prompt(tokenizer, text):
    return tokenizer([expand_image_placeholder(text)], return_tensors="pt")


def test_generation_with_cache_equals_without(tokenizer, model):
    batch = make_batch(tokenizer)
    enc = _prompt(tokenizer, "<image>\n What is it <bbox>? Where is it?[VG] ASSISTANT:")
    kwargs = dict(images_clip=batch["images_clip"][:1], images_dino=batch["images_dino"][:1],
                  image_sizes_hw=batch["image_sizes_hw"][:1],
                  region_boxes_xyxy_clip_norm=[torch.tensor([[0.1, 0.2, 0.5, 0.6]])], max_new_tokens=12)
    cached = model.generate(enc.input_ids, enc.attention_mask, use_cache=True, **kwargs)[0]
    uncached = model.generate(enc.input_ids, enc.attention_mask, use_cache=False, **kwargs)[0]
    assert len(cached.token_ids) > 0
    assert cached.token_ids == uncached.token_ids
    assert cached.vg_in_prompt == 1 and cached.boxes_xyxy_abs.shape == (1, 4)
    torch.testing.assert_close(cached.boxes_xyxy_abs, uncached.boxes_xyxy_abs)
    # Regions are injected during generation: another box changes the prefill.
    moved = model.generate(enc.input_ids, enc.attention_mask, **{
        **kwargs, "max_new_tokens": 1, "region_boxes_xyxy_clip_norm": [torch.tensor([[0.6, 0.6, 0.9, 0.9]])]})
    same = model.generate(enc.input_ids, enc.attention_mask, **{**kwargs, "max_new_tokens": 1})
    assert not torch.equal(moved[0].boxes_cxcywh_norm, same[0].boxes_cxcywh_norm) or \
        moved[0].scores.item() != same[0].scores.item()


def test_generated_vg_uses_the_step_that_produced_it(tokenizer, model, monkeypatch):
    batch = make_batch(tokenizer)
    kwargs = dict(images_clip=batch["images_clip"][:1], images_dino=batch["images_dino"][:1],
                  image_sizes_hw=batch["image_sizes_hw"][:1])
    ids = model.token_ids
    step = {"n": 0}
    original = model._next_token_logits

    def force_vg_then_eos(hidden_last):
        logits = original(hidden_last)
        forced = ids.vg if step["n"] == 0 else ids.eos
        step["n"] += 1
        logits[:, forced] = 1e9
        return logits

    enc = _prompt(tokenizer, "<image>\n Where is the dog?")
    monkeypatch.setattr(model, "_next_token_logits", force_vg_then_eos)
    generated = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=4, **kwargs)[0]
    monkeypatch.undo()
    assert generated.token_ids == [ids.vg] and generated.vg_in_prompt == 0
    # The same query as a [VG] written in the prompt right after the same tokens.
    enc_vg = _prompt(tokenizer, "<image>\n Where is the dog?[VG]")
    prompted = model.generate(enc_vg.input_ids, enc_vg.attention_mask, max_new_tokens=1, **kwargs)[0]
    torch.testing.assert_close(generated.boxes_xyxy_abs, prompted.boxes_xyxy_abs)
    torch.testing.assert_close(generated.scores, prompted.scores)
    # Box pixels are in the original image (640 x 480).
    assert float(generated.boxes_xyxy_abs.max()) <= 640 + 1e-3


def test_batched_generation_matches_single_prompts(tokenizer, model):
    texts = ["<image>\n What is it <bbox>? ASSISTANT:", "<image>\n Where is the dog in the picture?[VG] ASSISTANT:"]
    batch = make_batch(tokenizer)
    enc = tokenizer([expand_image_placeholder(t) for t in texts], padding=True, return_tensors="pt")
    regions = [torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.zeros(0, 4)]
    common = dict(images_clip=batch["images_clip"], images_dino=batch["images_dino"],
                  image_sizes_hw=batch["image_sizes_hw"], max_new_tokens=6)
    together = model.generate(enc.input_ids, enc.attention_mask, region_boxes_xyxy_clip_norm=regions, **common)
    for row in range(2):
        n = int(enc.attention_mask[row].sum())
        alone = model.generate(enc.input_ids[row:row + 1, :n], region_boxes_xyxy_clip_norm=regions[row:row + 1],
                               **{**common, "images_clip": batch["images_clip"][row:row + 1],
                                  "images_dino": batch["images_dino"][row:row + 1],
                                  "image_sizes_hw": batch["image_sizes_hw"][row:row + 1]})[0]
        assert together[row].token_ids == alone.token_ids
        torch.testing.assert_close(together[row].boxes_xyxy_abs, alone.boxes_xyxy_abs)


def test_clip_tower_is_registered_frozen_and_moves(tokenizer):
    model = build_tiny(tokenizer)
    assert all(not p.requires_grad for p in model.clip_tower.parameters())
    model.train()
    assert not model.clip_tower.vision_model.training
    model.to(torch.float64)
    assert model.clip_tower.vision_model.embeddings.patch_embedding.weight.dtype == torch.float64
    with torch.no_grad():
        out = model(**make_batch(tokenizer))
    # The whole model runs in float64 (no hard-coded casts); losses are reduced in at least fp32.
    assert torch.isfinite(out["loss"]) and out["grounding_loss"] > 0


def test_compiled_blocks_give_the_eager_losses_and_gradients(tokenizer):
    from chatterbox import accel

    torch._dynamo.reset()
    batch = make_batch(tokenizer)
    results = []
    for compiled in (False, True):
        model = build_tiny(tokenizer).eval()  # eval: no dropout, so both runs compute the same function
        if compiled:
            vision_blocks = (len(model.vision_branch.transformer.encoder.layers) * 2
                             + len(model.vision_branch.transformer.decoder.layers))
            # Fusion layers are compiled only where the grounding step runs from CUDA graphs.
            accel.use_grounding_loss_graphs(model)
            assert len(accel.compilable_blocks(model, language=False)) == vision_blocks + len(
                model.vision_branch.transformer.encoder.fusion_layers)
            accel.use_grounding_loss_graphs(model, False)
            # aot_eager traces forward and backward as inductor would, without needing a C++ compiler.
            assert accel.compile_layers(model, backend="aot_eager") == len(model.causal_lm.model.layers) + vision_blocks
        out = model(**batch)
        out["loss"].backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert set(model.state_dict()) == set(build_tiny(tokenizer).state_dict())  # names unchanged
    for key in ("loss", "lm_loss", "grounding_loss"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    torch._dynamo.reset()
