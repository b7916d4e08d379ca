"""``torch.compile`` of ChatterBox's repeated blocks, in place.

Fusing their elementwise work cuts the kernels the host launches per step by a large factor; parameter
names, state dicts and checkpoints are unchanged (``nn.Module.compile`` wraps the call, not the module).
"""
from __future__ import annotations

from torch import nn


def compilable_blocks(model, language: bool = True, vision: bool = True) -> list[nn.Module]:
    """The blocks :func:`compile_layers` compiles: the LLM decoder layers (``language``); the vision branch's
    deformable encoder, text and decoder layers (``vision``), and its image-text fusion layers when the
    grounding step runs from CUDA graphs (``use_grounding_loss_graphs``, so call that first).

    Compiled fusion layers pay only inside the graphs (eagerly their host time outweighs the gain); the
    region encoder stays eager: its time is in cuDNN's convolutions (docs/BENCHMARKS.md)."""
    blocks: list[nn.Module] = []
    if language:
        blocks += list(model.causal_lm.model.layers)
    if vision:
        encoder, decoder = model.vision_branch.transformer.encoder, model.vision_branch.transformer.decoder
        blocks += [*encoder.layers, *encoder.text_layers, *decoder.layers]
        runner = model.grounding_loss_runner
        if runner is not None and getattr(runner, "graphs", False):
            blocks += list(encoder.fusion_layers)
    return blocks


def compile_layers(model, language: bool = True, vision: bool = True, **compile_options) -> int:
    """Compile :func:`compilable_blocks` in place; ``compile_options`` go to ``nn.Module.compile`` (e.g.
    ``backend``). Returns the number of compiled blocks."""
    blocks = compilable_blocks(model, language, vision)
    for block in blocks:
        block.compile(**compile_options)
    return len(blocks)
