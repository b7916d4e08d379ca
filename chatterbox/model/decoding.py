"""Token-by-token decoding of the ChatterBox LLM, shared by ``ChatterBox.generate`` and ``ChatSession``.

Two parts:

* the *KV decoder* (:class:`KVDecoder`) owns the LLM's key/value state in a preallocated transformers
  ``StaticCache`` and runs the transformer: ``prefill(embeds)`` encodes a chunk of embeddings (images and
  regions already injected), ``step(tokens)`` feeds one token per row and returns the final hidden
  state, ``truncate(length)`` forgets cached positions beyond ``length``. Every decode step has fixed
  shapes, so on CUDA it is replayed from a captured CUDA graph (the prefill stays eager). The step itself
  is pluggable: transformers' own (:class:`TransformersStep`) or, by default where the LLM allows it,
  chatterbox.model.fast_decode's fused one (:class:`FusedStep`), compiled on CUDA and attending over a
  few length buckets with one graph each; :class:`DecodeOptions` chooses. :class:`RecomputeDecoder`
  keeps no cache and re-runs the whole sequence at every step (the reference for equivalence tests).
* :func:`decode` picks tokens: lm_head, placeholder tokens banned, greedy or sampled pick, all on the
  device. The generated ids and the hidden state each token was picked from stay on the GPU; the host
  looks at them only every ``check_every`` steps to stop once every row has produced end-of-sequence.
  A row that has finished is fed padding; the steps run past the end of every row (fewer than
  ``check_every``) are discarded by the caller with ``truncate``.

The query of a generated `[VG]` is the hidden state the `[VG]` was picked from (the state of the token
before it), the same as for a `[VG]` in the prompt; :class:`DecodeResult` carries those states.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from chatterbox.model.fast_decode import FusedLlamaStep, fuse_projection_weights, unsupported_reason

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# KV decoders
@dataclass(frozen=True)
class DecodeOptions:
    """How a KV decoder runs its decode steps. Speed only: every choice gives the same tokens.

    ``fused_step``: chatterbox.model.fast_decode's fused step (None: where the LLM allows it, else
    transformers' step with an info message; True: an error where it does not). ``compile_step``:
    ``torch.compile`` the step (None: the fused step on CUDA, never transformers' step);
    ``compile_options``: inductor options for it. ``cuda_graph``: replay the steps from CUDA graphs
    (None: on CUDA).
    """

    fused_step: bool | None = None
    compile_step: bool | None = None
    cuda_graph: bool | None = None
    compile_options: dict | None = None


class TransformersStep:
    """transformers' LLaMA forward over the static cache: reads every one of its ``capacity`` columns
    (masked beyond the current length), so it has one attention bucket, the capacity."""

    compiled = False

    def buckets(self, capacity: int) -> tuple[int, ...]:
        return (capacity,)

    def before_prefill(self, decoder: "KVDecoder") -> None:
        """Host-side set-up a prefill needs after steps of this kind (none)."""

    def before_step(self, decoder: "KVDecoder") -> None:
        """Host-side set-up of a step that a CUDA graph cannot do (none)."""

    def __call__(self, decoder: "KVDecoder", bucket: int) -> torch.Tensor:
        embeds = decoder.embed(decoder.tokens[:, None])
        return decoder.inner(inputs_embeds=embeds, attention_mask=decoder.mask,
                             position_ids=decoder.next_position[:, None], past_key_values=decoder.cache,
                             use_cache=True).last_hidden_state[:, -1]

    def uncompiled(self, decoder: "KVDecoder") -> "TransformersStep":
        return self


class CompiledTransformersStep(TransformersStep):
    """transformers' step under ``torch.compile`` (inductor fuses its small element-wise kernels)."""

    compiled = True

    def __init__(self):
        self._compiled = torch.compile(super().__call__, dynamic=False)

    def __call__(self, decoder: "KVDecoder", bucket: int) -> torch.Tensor:
        return self._compiled(decoder, bucket)

    def uncompiled(self, decoder: "KVDecoder") -> TransformersStep:
        return TransformersStep()


class FusedStep(TransformersStep):
    """chatterbox.model.fast_decode's fused step over the same cache buffers: it writes its keys/values
    at column ``length`` and attends over the smallest of its buckets that holds length + 1 (one CUDA
    graph per bucket), so a step reads about the keys/values in use rather than the whole capacity.
    ``compile`` compiles its two per-layer halves (``compile_options``: inductor options)."""

    #: Bucket width: at 13b the 8 graphs of a 2048-column session take well under a second to capture,
    #: and a step reads < 256 unused columns (at most 0.2 GB of keys/values at 13b, <1% of its weights).
    BUCKET_WIDTH = 256

    def __init__(self, decoder: "KVDecoder", compile: bool = False, compile_options: dict | None = None,
                 bucket_width: int = BUCKET_WIDTH):
        self.fused = FusedLlamaStep(decoder.causal_lm, decoder.cache, compile=compile, compile_options=compile_options)
        self.compiled = compile
        self.bucket_width = bucket_width
        self.column = torch.zeros(1, dtype=torch.long, device=decoder.device)

    def buckets(self, capacity: int) -> tuple[int, ...]:
        return attention_buckets(capacity, self.bucket_width)

    def before_prefill(self, decoder: "KVDecoder") -> None:
        decoder.set_cache_length(decoder.length)  # fused steps do not advance transformers' cache lengths

    def before_step(self, decoder: "KVDecoder") -> None:
        self.column.fill_(decoder.length)

    def __call__(self, decoder: "KVDecoder", bucket: int) -> torch.Tensor:
        return self.fused(decoder.tokens, decoder.next_position, self.column, decoder.mask, bucket)

    def uncompiled(self, decoder: "KVDecoder") -> "FusedStep":
        return FusedStep(decoder, compile=False, bucket_width=self.bucket_width)


def attention_buckets(capacity: int, width: int) -> tuple[int, ...]:
    """Multiples of ``width`` below ``capacity``, then ``capacity``: a step reads < ``width`` unused columns."""
    return (*range(width, capacity, width), capacity)


class _RowPositions:
    """What every decoder keeps of its ``batch_size`` rows: ``length`` columns encoded, and each row's next
    rotary position, which advances only over columns its padding mask marks real (left padding in batched
    generation). ``truncate`` and ``reset`` are the subclass's way of forgetting columns."""

    def __init__(self, causal_lm: nn.Module, batch_size: int, device: torch.device):
        self.inner = causal_lm.model
        self.embed = causal_lm.get_input_embeddings()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.length = 0
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def _chunk_positions(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None):
        if embeds.shape[0] != self.batch_size:
            raise ValueError(f"prefill of {embeds.shape[0]} rows into a decoder of batch size {self.batch_size}")
        if padding_mask is None:
            padding_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        padding_mask = padding_mask.to(self.device)
        positions = self.next_position[:, None] + (padding_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return padding_mask, positions

    def _check_truncate(self, length: int) -> int:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a decoder of {self.length} columns to {length}")
        removed = self.length - length
        if removed:
            self.next_position -= removed
        self.length = length
        return removed

    def truncate(self, length: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.truncate(0)
        self.next_position.zero_()


class KVDecoder(_RowPositions):
    """Runs the LLM over a growing sequence of ``batch_size`` rows in a preallocated ``StaticCache`` of
    ``capacity`` columns; ``length`` columns are encoded.

    Every row advances by one column per prefill column / decode step (see _RowPositions). The prefill is
    transformers' (images and regions in the embeddings, any length); a decode step is ``step_kind``'s
    (:class:`TransformersStep` by default, :class:`FusedStep`), on fixed-shape buffers. With
    ``cuda_graph`` each attention bucket's step is captured as a CUDA graph on its first use (or by
    :meth:`capture`) and replayed afterwards; a graph holds the model's weights by address, so changing the
    model afterwards (merging LoRA, moving it) needs a new decoder.
    """

    #: torch.compile's first call compiles, the second is the compiled kernels' first launch: both
    #: must happen before a capture.
    _COMPILED_WARM_UP_STEPS = 2

    def __init__(self, causal_lm: nn.Module, batch_size: int, capacity: int, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool | None = None,
                 step_kind: Callable[["KVDecoder"], TransformersStep] | None = None):
        from transformers import StaticCache

        super().__init__(causal_lm, batch_size, device)
        self.causal_lm = causal_lm
        config = causal_lm.config
        self.capacity = capacity
        self.cache = StaticCache(config=config, max_cache_len=capacity)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache.early_initialization(batch_size, num_kv_heads, head_dim, dtype, self.device)
        # Padding mask over every cache column: real until a prefill marks left padding.
        self.mask = torch.ones(batch_size, capacity, dtype=torch.bool, device=self.device)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.want_cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.want_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, the decoder is on {self.device}")
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, output)
        self.capture_s = 0.0
        if self.want_cuda_graph and unsupported_reason(causal_lm) is None:
            # A fused step made later re-points the q/k/v and gate/up weights into fused storage (and frees
            # the old); fusing them before this decoder's graphs record their addresses keeps those valid.
            fuse_projection_weights(causal_lm)
        self.step_kind = step_kind(self) if step_kind is not None else TransformersStep()

    @property
    def attention_buckets(self) -> tuple[int, ...]:
        """Cache columns a step may read, ascending; a step uses the smallest that holds length + 1."""
        return self.step_kind.buckets(self.capacity)

    def _bucket(self, columns: int) -> int:
        return next(bucket for bucket in self.attention_buckets if bucket >= columns)

    @property
    def uses_cuda_graph(self) -> bool:
        return bool(self._graphs)

    def set_cache_length(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``embeds`` [B,T,H] after what is cached; returns final hidden states [B,T,H].

        ``padding_mask`` [B,T] marks real columns (1) and left padding (0); None = all real."""
        columns = embeds.shape[1]
        if self.length + columns > self.capacity:
            raise ValueError(f"the sequence would be {self.length + columns} columns, more than the static KV "
                             f"cache's capacity of {self.capacity}")
        self.step_kind.before_prefill(self)
        padding_mask, positions = self._chunk_positions(embeds, padding_mask)
        self.mask[:, self.length:self.length + columns] = padding_mask.bool()
        self.mask[:, self.length + columns:] = True
        hidden = self.inner(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True).last_hidden_state
        self.next_position += padding_mask.long().sum(dim=1)
        self.length += columns
        return hidden

    def _step_body(self, bucket: int) -> torch.Tensor:
        """One decode step on the static buffers only (what a CUDA graph records)."""
        hidden = self.step_kind(self, bucket)
        self.next_position.add_(1)
        return hidden

    def _restore(self, position: torch.Tensor) -> None:
        self.set_cache_length(self.length)
        self.next_position.copy_(position)

    @torch.no_grad()
    def capture(self, buckets: tuple[int, ...] | None = None) -> bool:
        """Record the step of each of ``buckets`` (default: all) as a CUDA graph; needs a free column.

        Returns whether steps run from CUDA graphs. A step that cannot be compiled falls back to the
        uncompiled step, one that cannot be captured to eager steps, each with a warning."""
        if not self.want_cuda_graph:
            return False
        warm_up_steps = self._COMPILED_WARM_UP_STEPS if self.step_kind.compiled else 1
        if self.length >= self.capacity or self.length + warm_up_steps > self.capacity:
            return self.uses_cuda_graph
        start = time.perf_counter()
        for bucket in buckets or self.attention_buckets:
            if bucket in self._graphs:
                continue
            try:
                self._graphs[bucket] = self._capture_bucket(bucket, warm_up_steps)
            except RuntimeError as e:  # an op that cannot be compiled or captured: say so, then degrade
                torch.cuda.synchronize(self.device)
                if self.step_kind.compiled:
                    logger.warning("compiling the decode step failed, using the uncompiled step: %s", e)
                    self.step_kind = self.step_kind.uncompiled(self)
                    self._graphs.clear()
                    return self.capture(buckets)
                logger.warning("CUDA-graph capture of the decode step failed, decoding eagerly: %s", e)
                self.want_cuda_graph = False
                self._graphs.clear()
                return False
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start
        return True

    def _capture_bucket(self, bucket: int, warm_up_steps: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        saved_position = self.next_position.clone()
        saved_tokens = self.tokens.clone()
        try:
            # Warm-up on a side stream (lazy library initialisation must not happen during capture). It
            # writes keys/values into the column ``length``, which the next real step overwrites.
            self.step_kind.before_step(self)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warm_up_steps):
                    self._step_body(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(saved_position)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                hidden = self._step_body(bucket)
            # Capture records kernels without running them: the cache lengths and positions are unchanged.
            return graph, hidden
        finally:
            self._restore(saved_position)
            self.tokens.copy_(saved_tokens)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] ids on the device); returns the final hidden state [B,H]."""
        if self.length >= self.capacity:
            raise ValueError(f"the static KV cache is full ({self.capacity} columns)")
        bucket = self._bucket(self.length + 1)
        if self.want_cuda_graph and bucket not in self._graphs:
            self.capture((bucket,))
        self.tokens.copy_(tokens)
        self.step_kind.before_step(self)
        if bucket in self._graphs:
            graph, hidden = self._graphs[bucket]
            graph.replay()
        else:
            hidden = self._step_body(bucket)
        self.length += 1
        return hidden

    @torch.no_grad()
    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (positions move back by the same count)."""
        self._check_truncate(length)
        self.set_cache_length(length)
        self.mask[:, length:] = True

class RecomputeDecoder(_RowPositions):
    """No cache: every prefill and step re-runs the whole sequence (slow; the equivalence reference that
    ``generate(use_cache=False)`` runs). Same interface as :class:`KVDecoder`."""

    def __init__(self, causal_lm: nn.Module, batch_size: int, device: torch.device):
        super().__init__(causal_lm, batch_size, device)
        self.embeds: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def _append(self, embeds, padding_mask, positions) -> torch.Tensor:
        def cat(old, new):
            return new if old is None else torch.cat([old, new], dim=1)

        self.embeds = cat(self.embeds, embeds)
        self.mask = cat(self.mask, padding_mask.long())
        self.positions = cat(self.positions, positions)
        self.length += embeds.shape[1]
        return self.inner(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.positions,
                          use_cache=False).last_hidden_state

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        padding_mask, positions = self._chunk_positions(embeds, padding_mask)
        hidden = self._append(embeds, padding_mask, positions)
        self.next_position += padding_mask.long().sum(dim=1)
        return hidden[:, -embeds.shape[1]:]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.next_position[:, None].clone()
        hidden = self._append(self.embed(tokens[:, None]), torch.ones_like(positions), positions)
        self.next_position += 1
        return hidden[:, -1]

    @torch.no_grad()
    def truncate(self, length: int) -> None:
        self._check_truncate(length)
        if self.embeds is not None:
            self.embeds, self.mask, self.positions = (t[:, :length] for t in (self.embeds, self.mask, self.positions))


def make_kv_decoder(causal_lm: nn.Module, batch_size: int, capacity: int, device: torch.device | str,
                    dtype: torch.dtype | None = None, options: DecodeOptions = DecodeOptions()) -> KVDecoder:
    """A KV decoder of ``capacity`` columns whose steps run as ``options`` say (see DecodeOptions)."""
    device = torch.device(device)
    dtype = dtype or causal_lm.get_input_embeddings().weight.dtype
    reason = unsupported_reason(causal_lm) if options.fused_step is not False else None
    if reason and options.fused_step:
        raise ValueError(f"fused_step=True, but the fused decode step does not support this LLM: {reason}")
    if reason:
        logger.info("decoding with transformers' step: the fused step does not support this LLM (%s)", reason)
    if options.fused_step is False or reason:
        step_kind = CompiledTransformersStep if options.compile_step else TransformersStep
        return KVDecoder(causal_lm, batch_size, capacity, device, dtype, options.cuda_graph, lambda _: step_kind())
    compile_step = device.type == "cuda" if options.compile_step is None else options.compile_step
    return KVDecoder(causal_lm, batch_size, capacity, device, dtype, options.cuda_graph,
                     lambda decoder: FusedStep(decoder, compile_step, options.compile_options))


# ---------------------------------------------------------------------------------------------------
# token picking
@dataclass
class DecodeResult:
    """Per row: generated ids (end-of-sequence excluded) and the hidden state of each generated `[VG]`."""

    token_ids: list[list[int]]
    vg_hidden: list[list[torch.Tensor]]
    ended_by_eos: list[bool]
    steps: int                                   # decode positions the device ran (incl. run-ahead)
    extra: dict = field(default_factory=dict)

    def fed_tokens(self, row: int = 0) -> int:
        """Generated tokens of ``row`` that were fed back into the decoder (all but a length-cut last one)."""
        ids = self.token_ids[row]
        return len(ids) if self.ended_by_eos[row] else max(len(ids) - 1, 0)


@torch.no_grad()
def decode(model, decoder: KVDecoder, first_hidden: torch.Tensor, *, max_new_tokens: int, min_new_tokens: int = 0,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, check_every: int = 8,
           on_first_token: Callable[[], None] | None = None) -> DecodeResult:
    """Generate up to ``max_new_tokens`` per row, starting from the final hidden state of the prompt.

    ``model`` gives ``_next_token_logits`` (lm_head with placeholder tokens banned), ``_pick`` and
    ``token_ids``. End-of-sequence is suppressed for the first ``min_new_tokens`` tokens. The host syncs
    every ``check_every`` steps; ``on_first_token`` is called once the first token's pick is queued (a
    caller may record the time there).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = model.token_ids
    batch, device = first_hidden.shape[0], first_hidden.device
    tokens = torch.full((max_new_tokens, batch), ids.pad, dtype=torch.long, device=device)
    picked_from = first_hidden.new_empty((max_new_tokens, *first_hidden.shape))
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    hidden = first_hidden
    steps = 0
    for step in range(max_new_tokens):
        logits = model._next_token_logits(hidden)
        if step < min_new_tokens:
            logits[:, ids.eos] = float("-inf")
        picked = model._pick(logits, do_sample, temperature, top_p, generator)
        picked = picked.masked_fill(finished, ids.pad)
        tokens[step] = picked
        picked_from[step] = hidden  # a copy: a graph step reuses its output buffer
        finished |= picked == ids.eos
        steps = step + 1
        if step == 0 and on_first_token is not None:
            on_first_token()
        if steps == max_new_tokens or (steps % check_every == 0 and bool(finished.all())):
            break
        hidden = decoder.step(picked)

    token_rows = tokens[:steps].t().tolist()
    result = DecodeResult(token_ids=[], vg_hidden=[], ended_by_eos=[], steps=steps)
    for row, row_tokens in enumerate(token_rows):
        end = row_tokens.index(ids.eos) if ids.eos in row_tokens else len(row_tokens)
        kept = row_tokens[:end]
        result.token_ids.append(kept)
        result.ended_by_eos.append(end < len(row_tokens))
        result.vg_hidden.append([picked_from[s, row] for s, tok in enumerate(kept) if tok == ids.vg])
    return result
