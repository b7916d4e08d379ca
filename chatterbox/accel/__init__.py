"""The acceleration layer: runs a built ChatterBox faster on a GPU without changing what it computes.

Applied from outside, after the model is built and placed (the training run does it from the config):

    from chatterbox import accel
    accel.accelerate_training(model, cfg.train)

The model, its vision branch, the criterion and the matcher know nothing of it. Three pieces of the
computation have an optional runner hook, a callable that computes the same thing in their place, which
this layer fills:

* ``ClipTower.frozen_runner`` and ``VisionBranch.backbone_runner``: the frozen CLIP tower and Swin backbone
  replayed from CUDA graphs (:mod:`chatterbox.accel.frozen_graphs`);
* ``ChatterBox.grounding_loss_runner``: the grounding step's trainable vision part and loss, forward and
  backward, from CUDA graphs (:mod:`chatterbox.accel.grounding_graphs`);

and :mod:`chatterbox.accel.compile` compiles the repeated blocks in place (parameter names unchanged).
"""
from __future__ import annotations

from chatterbox.accel.compile import compilable_blocks, compile_layers
from chatterbox.accel.frozen_graphs import FrozenGraphRunner, use_frozen_encoder_graphs
from chatterbox.accel.grounding_graphs import GroundingLossGraphs, use_grounding_loss_graphs

__all__ = ["accelerate_training", "compilable_blocks", "compile_layers", "use_frozen_encoder_graphs",
           "use_grounding_loss_graphs", "FrozenGraphRunner", "GroundingLossGraphs"]


def accelerate_training(model, train_cfg, device=None) -> None:
    """What ``train.cuda_graph_frozen_encoders``, ``train.cuda_graph_grounding_loss`` and
    ``train.compile_layers`` ask for; the graphs only where the model runs on CUDA."""
    import logging

    import torch

    if train_cfg.zero_stage == 3:
        # ZeRO-3 frees and re-gathers every parameter around each module's use: a CUDA graph or a compiled
        # block would keep addresses and shapes that no longer hold
        logging.getLogger(__name__).info("train.zero_stage=3: CUDA graphs and compiled layers are not used")
        return
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda" and train_cfg.cuda_graph_frozen_encoders:
        use_frozen_encoder_graphs(model)
    if device.type == "cuda" and train_cfg.cuda_graph_grounding_loss:
        use_grounding_loss_graphs(model)
    if train_cfg.compile_layers != "none":
        compile_layers(model, vision=train_cfg.compile_layers == "all")
