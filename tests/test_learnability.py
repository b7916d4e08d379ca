"""The mechanism can learn: grounding follows the words, referring names what the box points at.

A short run of the tiny recipe (the Trainer, the data streams, the model as the quickstart trains them)
on a few synthetic scenes, then every question asked again about those same scenes. Memorising is
allowed here; what is measured is whether the answer depends on the words and on the region:

* grounding: success rate beside the query-swapped control (each question scored with the box its
  image got for another question, `evaluate_query_swap`). A model that ignores the `[VG]` query gives
  every question about an image the same box, so both rates are equal;
* referring: how often the reply names the pointed shape's colour (`names_object`). With 2-4 shapes of
  different colours or kinds per image, a model that ignores the region can at best name one of them.

The trained model asked again with both paths cut (the query head's and the region encoder's outputs
zeroed by forward hooks) must fail the assertions: that negative case is kept as a test, so the
measurement is shown able to tell. One pass serves both cuts: a grounding question has no `<bbox>` and a
referring question no `[VG]`, so neither cut reaches the other's questions.

The data mixtures are the quickstart's: most grounding samples are dialogues that ask for several shapes
of one image in turn, so the same image comes with different words and boxes.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chatterbox.config import load_config

STAGE1_STEPS = int(os.environ.get("CHATTERBOX_LEARNABILITY_STAGE1_STEPS", "400"))
STAGE2_STEPS = int(os.environ.get("CHATTERBOX_LEARNABILITY_STAGE2_STEPS", "300"))
NUM_SCENES = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from chatterbox.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("learnability") / "data"
    # eval_fraction=0 is not allowed (one scene is always held out); the measured scenes are the trained ones
    return write_corpus(root, num_images=NUM_SCENES + 1, seed=5, eval_fraction=0.01,
                        image_sizes=[(128, 128), (160, 128), (128, 160)])


def train_tiny(corpus, out: Path):
    """The quickstart's two stages and data mixtures, shortened: stage 1 (grounding), then stage 2
    (referring every step, grounding every 2nd, VQA every 5th; the base LLM frozen) from the stage-1
    weights."""
    from chatterbox.train.distributed import init_distributed
    from chatterbox.train.loop import Trainer
    from chatterbox.train.run import build_model, build_streams, seed_everything

    def config(stage: int, steps: int):
        sets = [f"data.paths.{k}={v}" for k, v in corpus.data_paths().items()]
        sets += [f"train.output_dir={out / f'stage{stage}'}", f"train.log_dir={out / 'runs'}",
                 f"train.steps_per_epoch={steps}", f"train.save_every_steps={steps}", "train.warmup_steps=10",
                 "train.init_from=", "data.num_workers=0"]
        return load_config(f"tiny_stage{stage}", sets)

    dist = init_distributed("cpu")
    seed_everything(0, 0)
    cfg = config(1, STAGE1_STEPS)
    model = build_model(cfg)
    Trainer(cfg, dist, model, build_streams(cfg, model.tokenizer, dist)).fit()
    cfg = config(2, STAGE2_STEPS)
    Trainer(cfg, dist, model, build_streams(cfg, model.tokenizer, dist)).fit()
    return cfg, model.eval()


def measure(cfg, model, corpus) -> dict:
    from chatterbox.eval.benchmarks import names_object
    from chatterbox.eval.grounding_metrics import GroundingRecord, evaluate_query_swap
    from chatterbox.eval.runner import GenerationRequest, RequestEncoder, generate_for_requests

    encoder = RequestEncoder.from_config(model.tokenizer, cfg)
    grounding, referring, shapes = [], [], []
    for scene in corpus.scenes:
        if scene.split != "train":
            continue
        path = str(Path(corpus.root) / "MSCOCO2017" / "train2017" / f"{scene.image_id:012d}.jpg")
        for j, shape in enumerate(scene.shapes):
            grounding.append(GenerationRequest.single_turn(f"g{scene.image_id}#{j}", path,
                                                           f"Where is the {shape.name}? [VG]"))
            referring.append(GenerationRequest.single_turn(f"r{scene.image_id}#{j}", path, "What is it <bbox>?",
                                                           [shape.box_xyxy_abs]))
            shapes.append(shape)
    with torch.no_grad():
        g_out = generate_for_requests(model, encoder, grounding, max_new_tokens=1, box_threshold=0.0)
        r_out = generate_for_requests(model, encoder, referring, max_new_tokens=8)
    records = [GroundingRecord(i, s.box_xyxy_abs, tuple(o["boxes_xyxy_abs"][0]), image_path=req.image_path,
                               prompt=s.name)
               for i, (s, o, req) in enumerate(zip(shapes, g_out, grounding))]
    result = evaluate_query_swap(records)
    result["colour_named"] = sum(names_object(o["text"], s.colour) for o, s in zip(r_out, shapes)) / len(shapes)
    result["name_named"] = sum(names_object(o["text"], s.name) for o, s in zip(r_out, shapes)) / len(shapes)
    result["replies"] = sorted({o["text"] for o in r_out})
    return result


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return train_tiny(corpus, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def intact(trained, corpus):
    return measure(*trained, corpus)


def grounds_the_words(m: dict) -> bool:
    return m["success_rate"] - m["success_rate_query_swapped"] >= 0.3


def names_the_region(m: dict) -> bool:
    return m["colour_named"] >= 0.7


def test_trained_tiny_model_names_the_region(intact):
    assert names_the_region(intact), intact


def test_trained_tiny_model_grounds_the_words(intact):
    assert grounds_the_words(intact), intact


def test_the_measurement_fails_when_the_paths_are_cut(trained, corpus):
    cfg, model = trained
    hooks = [module.register_forward_hook(lambda _module, _inputs, output: torch.zeros_like(output))
             for module in (model.query_head, model.region_encoder)]
    try:
        cut = measure(cfg, model, corpus)
    finally:
        for hook in hooks:
            hook.remove()
    assert cut["success_rate"] == cut["success_rate_query_swapped"], cut  # one box per image, whatever asked
    assert not grounds_the_words(cut), cut
    assert not names_the_region(cut), cut
