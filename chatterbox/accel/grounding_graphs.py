"""The grounding step's trainable vision part — input projections, deformable encoder and decoder, heads and
grounding loss, forward and backward — replayed from CUDA graphs.

Why: on a GPU that part runs ~50 ms of kernels but launches thousands of them, so its wall time is the
host's launch time and moves with the host (docs/BENCHMARKS.md). A captured graph launches them with one
call per direction.

A graph needs fixed shapes and no host synchronisation, so the step is run in a padded form: the query
count is rounded up to a multiple of ``query_multiple`` (padding queries get zero embeddings and no
targets; the vision branch treats every query on its own, so they change nothing for the real ones) and
the target slots per query up to a power of two; matching and losses are the criterion's one, fixed-shape
implementation (``GroundingCriterion.padded_terms``), which masks the padding out. One forward/backward
graph pair is captured per (padded query count, target slots, feature layout, dtype, train/eval mode,
placement of the weights). All pairs share one memory pool; that is safe because each pair runs strictly as
forward then backward, one at a time, which ``_Order`` enforces.

The graphs are used where :meth:`GroundingLossGraphs.accepts` holds (CUDA with the deformable-attention
kernel, grad enabled, frozen backbone, no activation checkpointing, at most ``DEVICE_MAX_TARGETS`` boxes
per query); elsewhere the runner declines (returns None) and the model runs its eager path.
``graphs=False`` runs the same padded computation eagerly (no capture): the CPU tests check it against the
eager path, the GPU tests the graphs against both.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from model.GroundingDINO import BackboneFeatures, GroundingCriterion, VisionBranch
from model.GroundingDINO.criterion import global_num_boxes
from model.GroundingDINO.matcher import DEVICE_MAX_TARGETS
from model.GroundingDINO.ms_deform_attn import uses_cuda_kernel

__all__ = ["GroundingLossGraphs", "use_grounding_loss_graphs"]

logger = logging.getLogger(__name__)


def padded_size(count: int, multiple: int) -> int:
    return max(multiple, math.ceil(count / multiple) * multiple)


def target_slots(max_count: int) -> int:
    """Target slots per query: the next power of two (few distinct graphs, little padding)."""
    return 1 << max(0, max_count - 1).bit_length()


@contextmanager
def _parameters_replaced(module: nn.Module, replacements: dict[int, nn.Parameter]):
    """Within the block, ``module`` and its sub-modules see ``replacements[id(p)]`` in place of each
    parameter ``p`` listed there (every place it is registered, shared modules included)."""
    slots = [(owner, name, param) for owner in module.modules() for name, param in owner._parameters.items()
             if param is not None and id(param) in replacements]
    for owner, name, param in slots:
        owner._parameters[name] = replacements[id(param)]
    try:
        yield
    finally:
        for owner, name, param in slots:
            owner._parameters[name] = param


@dataclass
class _Step:
    """Static buffers of one padded shape, and (when captured) its forward and backward graphs.

    The padded pass runs on ``aliases``: parameters that share the real parameters' memory (so the graphs
    read every weight update) but have gradient nodes of their own. The real parameters' nodes may be
    held by an earlier, still referenced autograd graph built on another stream, and a backward into them
    from inside a capture would make that stream wait on the capturing one, which CUDA refuses. The
    aliases' gradients go to the real parameters through ``_ReplayStep``."""

    params: list[nn.Parameter]
    aliases: list[nn.Parameter]
    slots: int                        # target slots per query
    features: list[torch.Tensor]      # the backbone's flat outputs (feature maps, masks, positions, image mask)
    queries: torch.Tensor             # [Qp, C] leaf, requires grad; rows past the real queries are zero
    # float32, flat: boxes [Qp,K,4], target mask [Qp,K], query mask [Qp], image index [Qp], num_boxes
    packed: torch.Tensor
    grad_loss: torch.Tensor           # 0-d, the incoming gradient of the loss
    suffixes: list[str] = field(default_factory=list)
    loss: torch.Tensor | None = None
    terms: torch.Tensor | None = None         # [criterion TERMS, layers], detached
    grad_queries: torch.Tensor | None = None
    grad_flat: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # used params' grads, one buffer per dtype
    used: list[bool] = field(default_factory=list)   # per param: does the loss depend on it
    forward_graph: torch.cuda.CUDAGraph | None = None
    backward_graph: torch.cuda.CUDAGraph | None = None

    def param_grads(self) -> list[torch.Tensor | None]:
        """Views of ONE fresh copy per dtype of the gradient buffers: autograd may keep a returned gradient
        as ``param.grad`` (and accumulate into it in place), so it must not alias memory that the next
        replay overwrites."""
        copies = {dtype: flat.clone() for dtype, flat in self.grad_flat.items()}
        offsets = dict.fromkeys(copies, 0)
        grads: list[torch.Tensor | None] = []
        for param, used in zip(self.params, self.used):
            if not used:
                grads.append(None)
                continue
            start = offsets[param.dtype]
            grads.append(copies[param.dtype][start:start + param.numel()].view_as(param))
            offsets[param.dtype] = start + param.numel()
        return grads


class _Order:
    """Each forward must be followed by its own backward before the next forward replays: graphs share one
    memory pool, and a forward's saved activations live in it until its backward has run."""

    def __init__(self):
        self.issued = 0
        self.pending: int | None = None

    def forward(self) -> int:
        self.issued += 1
        self.pending = self.issued
        return self.issued

    def backward(self, token: int) -> None:
        if self.pending != token:
            raise RuntimeError("the graphed grounding loss of an earlier forward pass was overwritten by a later "
                               "one: run each backward before the next forward, or turn off "
                               "train.cuda_graph_grounding_loss")
        self.pending = None


class _ReplayStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: "GroundingLossGraphs", step: _Step, queries: torch.Tensor, *params):
        runner.run_forward(step)
        ctx.runner, ctx.step, ctx.num_queries = runner, step, queries.shape[0]
        ctx.token = runner.order.forward()
        terms = step.terms.clone()
        ctx.mark_non_differentiable(terms)
        return step.loss.clone(), terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        step = ctx.step
        ctx.runner.order.backward(ctx.token)
        step.grad_loss.copy_(grad_loss)
        ctx.runner.run_backward(step)
        return (None, None, step.grad_queries[:ctx.num_queries].clone(), *step.param_grads())


class GroundingLossGraphs:
    """``runner(features, queries, query_image_index, target_boxes)`` -> the criterion's loss dict, computed
    from CUDA graphs (or, with ``graphs=False``, by the same padded computation run eagerly), or None where
    it does not :meth:`accepts` the call. ``ChatterBox.grounding_loss_runner`` takes it.

    ``max_graphs`` padded shapes are kept (least recently used dropped first); ``warmup_runs`` eager
    forward+backward passes precede a capture (lazy initialisation and compilation must not be captured).
    """

    def __init__(self, vision_branch: VisionBranch, criterion: GroundingCriterion, query_multiple: int = 4,
                 max_graphs: int = 8, warmup_runs: int = 2, graphs: bool = True):
        if min(query_multiple, max_graphs, warmup_runs) < 1:
            raise ValueError(f"query_multiple, max_graphs and warmup_runs must be at least 1, got {query_multiple}, "
                             f"{max_graphs}, {warmup_runs}")
        self.vision_branch, self.criterion = vision_branch, criterion
        self.query_multiple, self.max_graphs, self.warmup_runs = query_multiple, max_graphs, warmup_runs
        self.graphs = graphs
        self.order = _Order()
        self._steps: OrderedDict[tuple, _Step] = OrderedDict()
        self._pool = None
        self.captures = 0  # graph pairs captured so far (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        """Drop every captured step; their memory pool is freed with the last of them."""
        self._steps.clear()
        self._pool = None

    def accepts(self, queries: torch.Tensor, counts: Sequence[int]) -> bool:
        """Whether this step can run here (else the caller runs the eager path)."""
        cfg = self.vision_branch.cfg
        checkpointed = self.vision_branch.training and (cfg.use_transformer_ckpt or cfg.fusion_use_checkpoint)
        on_device = (queries.is_cuda and not torch.cuda.is_current_stream_capturing()
                     and uses_cuda_kernel(queries.device)) if self.graphs else True
        return (on_device and torch.is_grad_enabled() and not torch.is_autocast_enabled(queries.device.type)
                and cfg.freeze_backbone and not checkpointed and len(counts) > 0
                and self.criterion.matcher.solver != "scipy" and max(counts) <= DEVICE_MAX_TARGETS)

    # ------------------------------------------------------------------------------------------------
    def __call__(self, features: BackboneFeatures, queries: torch.Tensor, query_image_index,
                 target_boxes: Sequence[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """features: the frozen backbone's output for the batch's images; queries [Q,C] (in the vision
        branch's dtype); query_image_index: [Q] host integers, the image of each query; target_boxes: Q
        tensors [k_q,4] normalised cxcywh (k_q >= 0), best on the host: each one on a device costs a wait for
        the forward pass."""
        num_q, width = queries.shape[0], self.vision_branch.cfg.hidden_dim
        if queries.dim() != 2 or queries.shape[1] != width or num_q == 0:
            raise ValueError(f"queries must be [Q>=1,{width}], got shape {tuple(queries.shape)}")
        index = torch.as_tensor(query_image_index)
        if index.device.type != "cpu" or index.shape != (num_q,) or index.is_floating_point():
            raise ValueError(f"query_image_index must be {num_q} integers on the host, got {index.dtype} "
                             f"{tuple(index.shape)} on {index.device}")
        if int(index.min()) < 0 or int(index.max()) >= features.batch_size:
            raise ValueError(f"query_image_index {index.tolist()} out of range for {features.batch_size} images")
        if len(target_boxes) != num_q:
            raise ValueError(f"{len(target_boxes)} target sets for {num_q} queries")
        boxes = [torch.as_tensor(b).to("cpu", torch.float32) for b in target_boxes]
        for q, b in enumerate(boxes):
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"target_boxes[{q}] must be [k,4] normalised cxcywh, got {tuple(b.shape)}")
        counts = [int(b.shape[0]) for b in boxes]
        if not self.accepts(queries, counts):
            return None
        # On every call: its collective keeps the ranks in step (as the eager criterion).
        num_boxes = global_num_boxes(sum(counts), queries.device)

        padded_q, slots = padded_size(num_q, self.query_multiple), target_slots(max(counts))
        flat = [*features.feature_maps, *features.masks, *features.positions, features.image_mask]
        params = [p for p in self.vision_branch.parameters() if p.requires_grad]
        key = (padded_q, slots, queries.dtype, queries.device, self.vision_branch.training,
               tuple((tuple(t.shape), t.dtype) for t in flat), tuple(p.data_ptr() for p in params))
        step = self._steps.get(key)
        fresh = step is None
        if fresh:
            step = self._new_step(params, flat, queries, padded_q, slots)
        self._load(step, flat, queries, self._pack(boxes, index, padded_q, slots, num_boxes))
        if fresh:
            self._prepare(step)
            self._steps[key] = step
            while len(self._steps) > self.max_graphs:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        loss, terms = _ReplayStep.apply(self, step, queries, *step.params)
        return {**self.criterion.name_terms(terms, step.suffixes), "loss": loss}

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _pack(boxes: list[torch.Tensor], index: torch.Tensor, padded_q: int, slots: int,
              num_boxes: float) -> torch.Tensor:
        """Every per-call host input in one float32 tensor, so that it reaches the device in one copy."""
        packed_boxes = torch.full((padded_q, slots, 4), 0.5)  # padding slots: a valid dummy box
        target_mask = torch.zeros(padded_q, slots)
        for q, b in enumerate(boxes):
            packed_boxes[q, :b.shape[0]] = b
            target_mask[q, :b.shape[0]] = 1.0
        query_mask = (torch.arange(padded_q) < len(boxes)).float()
        image_index = torch.zeros(padded_q)
        image_index[:len(boxes)] = index.float()
        return torch.cat([packed_boxes.reshape(-1), target_mask.reshape(-1), query_mask, image_index,
                          torch.tensor([num_boxes])])

    @staticmethod
    def _unpack(packed: torch.Tensor, padded_q: int, slots: int):
        sizes = [padded_q * slots * 4, padded_q * slots, padded_q, padded_q, 1]
        boxes, target_mask, query_mask, image_index, num_boxes = packed.split(sizes)
        return (boxes.view(padded_q, slots, 4), target_mask.view(padded_q, slots) > 0.5, query_mask > 0.5,
                image_index.long(), num_boxes[0])

    def _new_step(self, params, flat, queries, padded_q: int, slots: int) -> _Step:
        device = queries.device
        return _Step(params=params, aliases=[nn.Parameter(p.detach()) for p in params], slots=slots,
                     features=[t.detach().clone() for t in flat],
                     queries=torch.zeros(padded_q, queries.shape[1], dtype=queries.dtype, device=device,
                                         requires_grad=True),
                     packed=torch.zeros(padded_q * (5 * slots + 2) + 1, device=device),
                     grad_loss=torch.ones((), device=device))

    @staticmethod
    def _load(step: _Step, flat, queries: torch.Tensor, packed: torch.Tensor) -> None:
        with torch.no_grad():
            torch._foreach_copy_(step.features, [t.detach() for t in flat])
            step.queries[:queries.shape[0]].copy_(queries.detach())
            step.queries[queries.shape[0]:].zero_()
            step.packed.copy_(packed, non_blocking=True)

    def _loss(self, step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded forward pass and loss on the step's static buffers -> (loss, terms [criterion TERMS, layers])."""
        padded_q = step.queries.shape[0]
        boxes, target_mask, query_mask, image_index, num_boxes = self._unpack(step.packed, padded_q, step.slots)
        levels = (len(step.features) - 1) // 3
        features = BackboneFeatures(step.features[:levels], step.features[levels:2 * levels],
                                    step.features[2 * levels:3 * levels], step.features[-1])
        token_mask = torch.ones((padded_q, 1), dtype=torch.bool, device=step.queries.device)
        with _parameters_replaced(self.vision_branch, {id(p): a for p, a in zip(step.params, step.aliases)}):
            outputs = self.vision_branch.decode_checked(features, step.queries[:, None, :], image_index, token_mask,
                                                        one_query_per_image=False, text_padding=False)
        layers = self.criterion.loss_layers(outputs)
        step.suffixes = [suffix for suffix, _ in layers]
        terms, _ = self.criterion.padded_terms([layer for _, layer in layers], token_mask, boxes, target_mask,
                                               query_mask, num_boxes)
        stacked = torch.stack([terms[name] for name in self.criterion.TERMS])
        return self.criterion.weighted_sum(stacked, step.suffixes, step.queries.device), stacked.detach()

    def _gradients(self, step: _Step, loss: torch.Tensor) -> None:
        """Backward of ``loss`` into the step's gradient buffers (one flat buffer per parameter dtype)."""
        grads = torch.autograd.grad(loss, [step.queries, *step.aliases], grad_outputs=step.grad_loss,
                                    allow_unused=True)
        step.grad_queries = grads[0] if grads[0] is not None else torch.zeros_like(step.queries)
        step.used = [g is not None for g in grads[1:]]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param, grad in zip(step.params, grads[1:]):
            if grad is not None:
                by_dtype.setdefault(param.dtype, []).append(grad.reshape(-1))
        step.grad_flat = {dtype: torch.cat(parts) for dtype, parts in by_dtype.items()}

    def _prepare(self, step: _Step) -> None:
        """Capture the step's graphs (with ``graphs=False`` there is nothing to prepare)."""
        if not self.graphs:
            return
        device = step.queries.device
        rng = torch.cuda.get_rng_state(device)  # warm-up and capture must not advance the training RNG
        # Warm-up and capture on one side stream: autograd runs a parameter's gradient on the stream its
        # gradient node was made on, and waiting for another stream from inside a capture is an error.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.enable_grad():
            for _ in range(self.warmup_runs):
                loss, _ = self._loss(step)
                self._gradients(step, loss)
            del loss  # its graph would keep the warm-up's gradient nodes alive
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        step.forward_graph, step.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.enable_grad():
            with torch.cuda.graph(step.forward_graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                step.loss, step.terms = self._loss(step)
            with torch.cuda.graph(step.backward_graph, pool=self._pool, stream=side,
                                  capture_error_mode="thread_local"):
                self._gradients(step, step.loss)
        # Keep the output buffer, drop the captured autograd graph (and the gradient nodes it holds).
        step.loss = step.loss.detach()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.set_rng_state(rng, device)
        self.captures += 1
        logger.info("grounding step: CUDA graphs captured for %d padded queries x %d target slots (%d captures so far)",
                    step.queries.shape[0], step.slots, self.captures)

    def run_forward(self, step: _Step) -> None:
        if self.graphs:
            step.forward_graph.replay()
            return
        with torch.enable_grad():
            step.loss, step.terms = self._loss(step)

    def run_backward(self, step: _Step) -> None:
        if self.graphs:
            step.backward_graph.replay()
            return
        self._gradients(step, step.loss)
        step.loss = None  # the eager graph is freed by the backward


def use_grounding_loss_graphs(model, enabled: bool = True, **options) -> None:
    """Run ``model``'s grounding step (trainable vision part and loss, forward and backward) from CUDA graphs
    where it can; ``options`` go to GroundingLossGraphs (``query_multiple``, ``max_graphs``, ``graphs=False``
    for its eager form)."""
    model.grounding_loss_runner = GroundingLossGraphs(model.vision_branch, model.grounding_criterion, **options) \
        if enabled else None
