"""The grounding step's trainable vision part — input projections, deformable encoder and decoder, heads and
grounding loss, forward and backward — replayed from CUDA graphs.

Why: on a GPU that part runs ~50 ms of kernels but launches thousands of them, so its wall time is the
host's launch time and moves with the host (docs/BENCHMARKS.md). A captured graph launches them with one
call per direction.

A graph needs fixed shapes and no host synchronisation, so the step runs in padded chunks: the queries are
split into chunks of ``query_chunk`` (the last one rounded up to a multiple of ``query_multiple``; padding
queries get zero embeddings and no targets, and the vision branch treats every query on its own, so they
change nothing for the real ones), and the target slots per query are rounded up to a power of two;
matching and losses are the criterion's one, fixed-shape implementation (``GroundingCriterion.padded_terms``),
which masks the padding out. The loss is a sum over queries divided by batch-wide counts, so the chunks'
losses and gradients add up to the whole step's.

Each chunk runs its forward and its backward at once, inside the model's forward pass: the loss enters the
model's total loss linearly, so its incoming gradient is one scalar, which the model's backward pass
multiplies in. So a chunk's activations live only while it runs: every graph shares one memory pool whose
size is that of the largest chunk, whatever the batch's query count, and nothing in it waits for the
language model's backward. One graph pair is captured per (padded chunk size, target slots, feature layout,
dtype, train/eval mode, placement of the weights).

The graphs are used where :meth:`GroundingLossGraphs.accepts` holds (CUDA with the deformable-attention
kernel, grad enabled, bf16 or fp32 (fp16 needs its loss scale inside the backward), frozen backbone, no
activation checkpointing, at most ``DEVICE_MAX_TARGETS`` boxes per query); elsewhere the runner declines
(returns None) and the model runs its eager path. ``graphs=False`` runs the same chunked computation
eagerly (no capture): the CPU tests check it against the eager path, the GPU tests the graphs against both.
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


def query_chunks(num_queries: int, chunk: int, multiple: int) -> list[tuple[int, int, int]]:
    """(first query, real queries, padded size) of each chunk: full chunks of ``chunk``, then the rest
    rounded up to a multiple of ``multiple`` (at most ``chunk``)."""
    chunks = [(start, chunk, chunk) for start in range(0, num_queries - num_queries % chunk, chunk)]
    rest = num_queries % chunk
    if rest:
        chunks.append((num_queries - rest, rest, min(chunk, padded_size(rest, multiple))))
    return chunks


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
class _Layout:
    """What the chunks of one feature layout share: the backbone's outputs, copied in once per step, and the
    gradient accumulators that every chunk's backward adds into (both outside the graphs' pool)."""

    features: list[torch.Tensor]      # the backbone's flat outputs (feature maps, masks, positions, image mask)
    grad_sums: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # used params' grads, per dtype
    used: list[bool] | None = None    # per param: does the loss depend on it


@dataclass
class _Step:
    """Static buffers of one padded chunk shape, and (when captured) its forward and backward graphs.

    The padded pass runs on ``aliases``: parameters that share the real parameters' memory (so the graphs
    read every weight update) but have gradient nodes of their own. The real parameters' nodes may be
    held by an earlier, still referenced autograd graph built on another stream, and a backward into them
    from inside a capture would make that stream wait on the capturing one, which CUDA refuses."""

    params: list[nn.Parameter]
    aliases: list[nn.Parameter]
    layout: _Layout
    slots: int                        # target slots per query
    queries: torch.Tensor             # [Qp, C] leaf, requires grad; rows past the real queries are zero
    # float32, flat: boxes [Qp,K,4], target mask [Qp,K], query mask [Qp], image index [Qp], num_boxes, pairs
    packed: torch.Tensor
    suffixes: list[str] = field(default_factory=list)
    loss: torch.Tensor | None = None
    terms: torch.Tensor | None = None         # [criterion TERMS, layers], detached
    grad_queries: torch.Tensor | None = None
    forward_graph: torch.cuda.CUDAGraph | None = None
    backward_graph: torch.cuda.CUDAGraph | None = None


class _ChunkedStep(torch.autograd.Function):
    """Forward: every chunk's forward and backward (gradients for a loss gradient of 1). Backward: those
    gradients times the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, runner: "GroundingLossGraphs", layout: _Layout, plan, queries: torch.Tensor, *params):
        loss, terms, ctx.grad_queries, ctx.grad_sums = runner.run(layout, plan, queries)
        ctx.param_shapes, ctx.used = [(p.dtype, p.shape) for p in params], layout.used
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        grads: list[torch.Tensor | None] = []
        offsets = dict.fromkeys(ctx.grad_sums, 0)
        for flat in ctx.grad_sums.values():
            flat.mul_(grad_loss.to(flat.dtype))
        for (dtype, shape), used in zip(ctx.param_shapes, ctx.used):
            if not used:
                grads.append(None)
                continue
            start, size = offsets[dtype], shape.numel()
            grads.append(ctx.grad_sums[dtype][start:start + size].view(shape))
            offsets[dtype] = start + size
        return (None, None, None, ctx.grad_queries * grad_loss.to(ctx.grad_queries.dtype), *grads)


class GroundingLossGraphs:
    """``runner(features, queries, query_image_index, target_boxes)`` -> the criterion's loss dict, computed
    from CUDA graphs (or, with ``graphs=False``, by the same chunked computation run eagerly), or None where
    it does not :meth:`accepts` the call. ``ChatterBox.grounding_loss_runner`` takes it.

    ``max_graphs`` padded chunk shapes are kept (least recently used dropped first); ``warmup_runs`` eager
    forward+backward passes precede a capture (lazy initialisation and compilation must not be captured).
    Two queries per chunk: at the 13b shapes (six 512-px images per micro-batch) the pool holds 6.7 GiB with
    chunks of 2 and 18.8 GiB with chunks of 8, which left an 80 GB card too little for the language model
    (docs/results/train_step/2026-12-08_h100_grounding_chunks); one padded size also means one compiled shape.
    """

    def __init__(self, vision_branch: VisionBranch, criterion: GroundingCriterion, query_chunk: int = 2,
                 query_multiple: int = 2, max_graphs: int = 16, warmup_runs: int = 2, graphs: bool = True):
        if min(query_chunk, query_multiple, max_graphs, warmup_runs) < 1:
            raise ValueError(f"query_chunk, query_multiple, max_graphs and warmup_runs must be at least 1, got "
                             f"{query_chunk}, {query_multiple}, {max_graphs}, {warmup_runs}")
        self.vision_branch, self.criterion = vision_branch, criterion
        self.query_chunk, self.query_multiple = query_chunk, query_multiple
        self.max_graphs, self.warmup_runs, self.graphs = max_graphs, warmup_runs, graphs
        self._steps: OrderedDict[tuple, _Step] = OrderedDict()
        self._layouts: dict[tuple, _Layout] = {}
        self._pool = None
        self.captures = 0  # graph pairs captured so far (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        """Drop every captured step; their memory pool is freed with the last of them."""
        self._steps.clear()
        self._layouts.clear()
        self._pool = None

    def accepts(self, queries: torch.Tensor, counts: Sequence[int]) -> bool:
        """Whether this step can run here (else the caller runs the eager path)."""
        cfg = self.vision_branch.cfg
        checkpointed = self.vision_branch.training and (cfg.use_transformer_ckpt or cfg.fusion_use_checkpoint)
        on_device = (queries.is_cuda and not torch.cuda.is_current_stream_capturing()
                     and uses_cuda_kernel(queries.device)) if self.graphs else True
        return (on_device and torch.is_grad_enabled() and not torch.is_autocast_enabled(queries.device.type)
                and queries.dtype != torch.float16 and cfg.freeze_backbone and not checkpointed
                and len(counts) > 0 and self.criterion.matcher.solver != "scipy"
                and max(counts) <= DEVICE_MAX_TARGETS)

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
        local_pairs = sum(counts)
        # On every call: its collective keeps the ranks in step (as the eager criterion).
        num_boxes = global_num_boxes(local_pairs, queries.device)

        flat = [*features.feature_maps, *features.masks, *features.positions, features.image_mask]
        params = [p for p in self.vision_branch.parameters() if p.requires_grad]
        layout_key = (queries.dtype, queries.device, self.vision_branch.training,
                      tuple((tuple(t.shape), t.dtype) for t in flat), tuple(p.data_ptr() for p in params))
        layout = self._layouts.get(layout_key)
        if layout is None:
            layout = self._layouts[layout_key] = _Layout([t.detach().clone() for t in flat])
        with torch.no_grad():
            torch._foreach_copy_(layout.features, [t.detach() for t in flat])
        chunks = [(start, real, padded, target_slots(max(counts[start:start + real])))
                  for start, real, padded in query_chunks(num_q, self.query_chunk, self.query_multiple)]
        host = [self._pack(boxes[start:start + real], index[start:start + real], padded, slots, num_boxes, local_pairs)
                for start, real, padded, slots in chunks]
        packed = torch.cat(host).to(queries.device, non_blocking=True)  # every chunk's inputs in one copy
        plan, offset = [], 0
        for (start, real, padded, slots), chunk_host in zip(chunks, host):
            chunk_packed = packed[offset:offset + chunk_host.numel()]
            offset += chunk_host.numel()
            step = self._step(layout_key, layout, params, queries[start:start + real], chunk_packed, padded, slots)
            plan.append((start, real, step, chunk_packed))
        # Captures above ran warm-up passes that added into the sums; the step starts from zero.
        for flat_sum in layout.grad_sums.values():
            flat_sum.zero_()
        loss, terms = _ChunkedStep.apply(self, layout, plan, queries, *params)
        return {**self.criterion.name_terms(terms, plan[0][2].suffixes), "loss": loss}

    def _step(self, layout_key, layout: _Layout, params, queries, packed, padded_q: int, slots: int) -> _Step:
        """The step of this chunk shape; a new one is captured with the chunk's own inputs (``queries``, its
        real queries, and ``packed``) loaded, so its warm-up passes run on real data."""
        key = (padded_q, slots, layout_key)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step
        device = queries.device
        step = _Step(params=params, aliases=[nn.Parameter(p.detach()) for p in params], layout=layout, slots=slots,
                     queries=torch.zeros(padded_q, queries.shape[1], dtype=queries.dtype, device=device,
                                         requires_grad=True),
                     packed=torch.zeros(padded_q * (5 * slots + 2) + 2, device=device))
        self._load(step, queries, packed)
        self._prepare(step)
        self._steps[key] = step
        while len(self._steps) > self.max_graphs:
            self._steps.popitem(last=False)
        live = {id(s.layout) for s in self._steps.values()}
        self._layouts = {k: v for k, v in self._layouts.items() if id(v) in live}
        return step

    def run(self, layout: _Layout, plan, queries: torch.Tensor):
        """Every chunk of ``plan`` forward and backward -> (loss, terms, grad of queries, gradient sums)."""
        grad_queries = torch.empty_like(queries)
        loss = terms = None
        for start, real, step, chunk_packed in plan:
            self._load(step, queries[start:start + real], chunk_packed)
            self._run(step)
            grad_queries[start:start + real] = step.grad_queries[:real]
            loss = step.loss.clone() if loss is None else loss + step.loss
            terms = step.terms.clone() if terms is None else terms + step.terms
        # A fresh copy: autograd may keep a returned gradient as ``param.grad`` and accumulate into it in place.
        return loss, terms, grad_queries, {dtype: flat.clone() for dtype, flat in layout.grad_sums.items()}

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _load(step: _Step, queries: torch.Tensor, packed: torch.Tensor) -> None:
        """A chunk's real queries (the rest zero) and its packed inputs into the step's static buffers."""
        with torch.no_grad():
            step.queries[:queries.shape[0]].copy_(queries.detach())
            step.queries[queries.shape[0]:].zero_()
            step.packed.copy_(packed)

    @staticmethod
    def _pack(boxes: list[torch.Tensor], index: torch.Tensor, padded_q: int, slots: int,
              num_boxes: float, local_pairs: int) -> torch.Tensor:
        """Every per-chunk host input in one float32 tensor, so that a step's chunks reach the device in one copy."""
        packed_boxes = torch.full((padded_q, slots, 4), 0.5)  # padding slots: a valid dummy box
        target_mask = torch.zeros(padded_q, slots)
        for q, b in enumerate(boxes):
            packed_boxes[q, :b.shape[0]] = b
            target_mask[q, :b.shape[0]] = 1.0
        query_mask = (torch.arange(padded_q) < len(boxes)).float()
        image_index = torch.zeros(padded_q)
        image_index[:len(boxes)] = index.float()
        return torch.cat([packed_boxes.reshape(-1), target_mask.reshape(-1), query_mask, image_index,
                          torch.tensor([num_boxes, float(local_pairs)])])

    @staticmethod
    def _unpack(packed: torch.Tensor, padded_q: int, slots: int):
        sizes = [padded_q * slots * 4, padded_q * slots, padded_q, padded_q, 1, 1]
        boxes, target_mask, query_mask, image_index, num_boxes, local_pairs = packed.split(sizes)
        return (boxes.view(padded_q, slots, 4), target_mask.view(padded_q, slots) > 0.5, query_mask > 0.5,
                image_index.long(), num_boxes[0], local_pairs[0])

    def _loss(self, step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded forward pass and loss of one chunk on the step's static buffers -> (loss, terms
        [criterion TERMS, layers])."""
        padded_q = step.queries.shape[0]
        boxes, target_mask, query_mask, image_index, num_boxes, local_pairs = self._unpack(step.packed, padded_q,
                                                                                           step.slots)
        levels = (len(step.layout.features) - 1) // 3
        f = step.layout.features
        features = BackboneFeatures(f[:levels], f[levels:2 * levels], f[2 * levels:3 * levels], f[-1])
        token_mask = torch.ones((padded_q, 1), dtype=torch.bool, device=step.queries.device)
        with _parameters_replaced(self.vision_branch, {id(p): a for p, a in zip(step.params, step.aliases)}):
            outputs = self.vision_branch.decode_checked(features, step.queries[:, None, :], image_index, token_mask,
                                                        one_query_per_image=False, text_padding=False)
        layers = self.criterion.loss_layers(outputs)
        step.suffixes = [suffix for suffix, _ in layers]
        terms, _ = self.criterion.padded_terms([layer for _, layer in layers], token_mask, boxes, target_mask,
                                               query_mask, num_boxes, local_pairs=local_pairs)
        stacked = torch.stack([terms[name] for name in self.criterion.TERMS])
        return self.criterion.weighted_sum(stacked, step.suffixes, step.queries.device), stacked.detach()

    def _gradients(self, step: _Step, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (for a loss gradient of 1), added into the layout's gradient sums."""
        grads = torch.autograd.grad(loss, [step.queries, *step.aliases], allow_unused=True)
        step.grad_queries = grads[0] if grads[0] is not None else torch.zeros_like(step.queries)
        used = [g is not None for g in grads[1:]]
        layout = step.layout
        if layout.used is None:
            layout.used = used
            layout.grad_sums = {}
            for param, grad in zip(step.params, grads[1:]):
                if grad is not None:
                    layout.grad_sums[param.dtype] = layout.grad_sums.get(param.dtype, 0) + grad.numel()
            layout.grad_sums = {dtype: torch.zeros(n, dtype=dtype, device=step.queries.device)
                                for dtype, n in layout.grad_sums.items()}
        elif layout.used != used:
            raise RuntimeError("chunks of one grounding step depend on different parameters")
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param, grad in zip(step.params, grads[1:]):
            if grad is not None:
                by_dtype.setdefault(param.dtype, []).append(grad.reshape(-1))
        for dtype, parts in by_dtype.items():
            layout.grad_sums[dtype].add_(torch.cat(parts))

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

    def _run(self, step: _Step) -> None:
        """One chunk forward and backward: its loss, terms and query gradient in the step, its parameter
        gradients added into the layout's sums."""
        if self.graphs:
            step.forward_graph.replay()
            step.backward_graph.replay()
            return
        with torch.enable_grad():
            step.loss, step.terms = self._loss(step)
            self._gradients(step, step.loss)
        step.loss = step.loss.detach()


def use_grounding_loss_graphs(model, enabled: bool = True, **options) -> None:
    """Run ``model``'s grounding step (trainable vision part and loss, forward and backward) from CUDA graphs
    where it can; ``options`` go to GroundingLossGraphs (``query_chunk``, ``query_multiple``, ``max_graphs``,
    ``graphs=False`` for its eager form)."""
    model.grounding_loss_runner = GroundingLossGraphs(model.vision_branch, model.grounding_criterion, **options) \
        if enabled else None
