"""Token-by-token decoding of the ChatterBox LLM, shared by ``ChatterBox.generate`` and ``ChatSession``.

Two parts:

* a *KV decoder* owns the LLM's key/value state and runs the transformer: ``prefill(embeds)`` encodes a
  chunk of embeddings (images and regions already injected), ``step(tokens)`` feeds one token per row
  and returns the final hidden state, ``truncate(length)`` forgets cached positions beyond ``length``.
  :class:`StaticKVDecoder` preallocates a transformers ``StaticCache`` of a fixed capacity, so every
  decode step has fixed shapes and, on CUDA, is replayed from a captured CUDA graph (the prefill stays
  eager); by default (:class:`FusedStaticKVDecoder`) the step is chatterbox.model.fast_decode's fused
  one, compiled on CUDA, attending over a few length buckets with one graph each.
  :class:`DynamicKVDecoder` grows a ``DynamicCache``; :class:`RecomputeDecoder` keeps no cache and
  re-runs the whole sequence at every step (the reference for equivalence tests).
* :func:`decode` picks tokens: lm_head, placeholder tokens banned, greedy or sampled pick, all on the
  device. The generated ids and the hidden state each token was picked from stay on the GPU; the host
  looks at them only every ``check_every`` steps to stop once every row has produced end-of-sequence.
  A row that has finished is fed padding, exactly as before; the steps run past the end of every row
  (fewer than ``check_every``) are discarded by the caller with ``truncate``.

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

#: Decoder kinds accepted by :func:`make_kv_decoder`.
CACHE_KINDS = ("static", "dynamic", "none")


# ---------------------------------------------------------------------------------------------------
# KV decoders
class KVDecoder:
    """Runs the LLM over a growing sequence of ``batch_size`` rows; ``length`` columns are encoded.

    Every row advances by one column per prefill column / decode step. A row's rotary position advances
    only over columns its padding mask marks real (left padding in batched generation).
    """

    def __init__(self, causal_lm: nn.Module, batch_size: int, device: torch.device):
        self.causal_lm = causal_lm
        self.inner = causal_lm.model
        self.embed = causal_lm.get_input_embeddings()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.length = 0
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    uses_cuda_graph = False

    def _chunk_positions(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None):
        if embeds.shape[0] != self.batch_size:
            raise ValueError(f"prefill of {embeds.shape[0]} rows into a decoder of batch size {self.batch_size}")
        if padding_mask is None:
            padding_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        padding_mask = padding_mask.to(self.device)
        positions = self.next_position[:, None] + (padding_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return padding_mask, positions

    def prefill(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``embeds`` [B,T,H] after what is cached; returns final hidden states [B,T,H].

        ``padding_mask`` [B,T] marks real columns (1) and left padding (0); None = all real."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] ids on the device); returns the final hidden state [B,H]."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (positions move back by the same count)."""
        raise NotImplementedError

    def _check_truncate(self, length: int) -> int:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a decoder of {self.length} columns to {length}")
        removed = self.length - length
        if removed:
            self.next_position -= removed
        self.length = length
        return removed

    def reset(self) -> None:
        self.truncate(0)
        self.next_position.zero_()


class StaticKVDecoder(KVDecoder):
    """A preallocated ``StaticCache`` of ``capacity`` columns; decode steps replayed from CUDA graphs.

    This class runs transformers' own step, which reads keys/values of all ``capacity`` columns every
    step (masked beyond the current length), so it has one attention bucket: the capacity.
    :class:`FusedStaticKVDecoder` (the default where the LLM allows it) runs a fused step that reads only
    the smallest bucket >= length + 1. On CUDA each bucket's step is captured as a CUDA graph on its
    first use (or by :meth:`capture`) and replayed afterwards; a graph holds the model's weights by
    address, so changing the model afterwards (merging LoRA, moving it) needs a new decoder.
    ``compile_step=True`` first compiles the step with ``torch.compile`` (inductor fuses the small
    element-wise kernels); the first decoder of a process pays the compilation.
    """

    #: torch.compile's first call compiles, the second is the compiled kernels' first launch: both
    #: must happen before a capture.
    _COMPILED_WARM_UP_STEPS = 2

    def __init__(self, causal_lm: nn.Module, batch_size: int, capacity: int, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool | None = None, compile_step: bool = False):
        from transformers import StaticCache

        super().__init__(causal_lm, batch_size, device)
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
        self.compile_step = compile_step
        self._body = torch.compile(self._step_body, dynamic=False) if compile_step else self._step_body
        if self.want_cuda_graph and unsupported_reason(causal_lm) is None:
            # A fused decoder made later re-points the q/k/v and gate/up weights into fused storage (and
            # frees the old); fusing them before this decoder's graphs record their addresses keeps those valid.
            fuse_projection_weights(causal_lm)

    @property
    def attention_buckets(self) -> tuple[int, ...]:
        """Cache columns a step may read, ascending; a step uses the smallest that holds length + 1."""
        return (self.capacity,)

    def _bucket(self, columns: int) -> int:
        return next(bucket for bucket in self.attention_buckets if bucket >= columns)

    @property
    def uses_cuda_graph(self) -> bool:
        return bool(self._graphs)

    def _set_cache_length(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        columns = embeds.shape[1]
        if self.length + columns > self.capacity:
            raise ValueError(f"the sequence would be {self.length + columns} columns, more than the static KV "
                             f"cache's capacity of {self.capacity}")
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
        embeds = self.embed(self.tokens[:, None])
        hidden = self.inner(inputs_embeds=embeds, attention_mask=self.mask, position_ids=self.next_position[:, None],
                            past_key_values=self.cache, use_cache=True).last_hidden_state[:, -1]
        self.next_position.add_(1)
        return hidden

    def _before_step(self) -> None:
        """Host-side set-up of a step that the graph cannot do (transformers' step needs none)."""

    def _restore(self, position: torch.Tensor) -> None:
        self._set_cache_length(self.length)
        self.next_position.copy_(position)

    @torch.no_grad()
    def capture(self, buckets: tuple[int, ...] | None = None) -> bool:
        """Record the step of each of ``buckets`` (default: all) as a CUDA graph; needs a free column.

        Returns whether steps run from CUDA graphs. A step that cannot be compiled falls back to the
        uncompiled step, one that cannot be captured to eager steps, each with a warning."""
        if not self.want_cuda_graph:
            return False
        warm_up_steps = self._COMPILED_WARM_UP_STEPS if self.compile_step else 1
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
                if self.compile_step:
                    logger.warning("compiling the decode step failed, using the uncompiled step: %s", e)
                    self._disable_compile()
                    return self.capture(buckets)
                logger.warning("CUDA-graph capture of the decode step failed, decoding eagerly: %s", e)
                self.want_cuda_graph = False
                self._graphs.clear()
                return False
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start
        return True

    def _disable_compile(self) -> None:
        self.compile_step = False
        self._body = self._step_body
        self._graphs.clear()

    def _capture_bucket(self, bucket: int, warm_up_steps: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        saved_position = self.next_position.clone()
        saved_tokens = self.tokens.clone()
        try:
            # Warm-up on a side stream (lazy library initialisation must not happen during capture). It
            # writes keys/values into the column ``length``, which the next real step overwrites.
            self._before_step()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warm_up_steps):
                    self._body(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(saved_position)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                hidden = self._body(bucket)
            # Capture records kernels without running them: the cache lengths and positions are unchanged.
            return graph, hidden
        finally:
            self._restore(saved_position)
            self.tokens.copy_(saved_tokens)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.capacity:
            raise ValueError(f"the static KV cache is full ({self.capacity} columns)")
        bucket = self._bucket(self.length + 1)
        if self.want_cuda_graph and bucket not in self._graphs:
            self.capture((bucket,))
        self.tokens.copy_(tokens)
        self._before_step()
        if bucket in self._graphs:
            graph, hidden = self._graphs[bucket]
            graph.replay()
        else:
            hidden = self._body(bucket)
        self.length += 1
        return hidden

    @torch.no_grad()
    def truncate(self, length: int) -> None:
        self._check_truncate(length)
        self._set_cache_length(length)
        self.mask[:, length:] = True


def attention_buckets(capacity: int, width: int) -> tuple[int, ...]:
    """Multiples of ``width`` below ``capacity``, then ``capacity``: a step reads < ``width`` unused columns."""
    return (*range(width, capacity, width), capacity)


class FusedStaticKVDecoder(StaticKVDecoder):
    """The static decoder with chatterbox.model.fast_decode's fused step over the same cache buffers.

    The prefill is transformers' (images and regions in the embeddings, any length); the step writes
    its keys/values at column ``length`` and attends over the smallest of :attr:`attention_buckets`
    that holds length + 1 (one CUDA graph per bucket), so a step reads about the keys/values in use
    rather than the whole capacity. ``compile_step`` compiles the fused step's two per-layer halves
    (``compile_options``: inductor options for it, see FusedLlamaStep).
    """

    #: Bucket width: at 13b the 8 graphs of a 2048-column session take well under a second to capture,
    #: and a step reads < 256 unused columns (at most 0.2 GB of keys/values at 13b, <1% of its weights).
    BUCKET_WIDTH = 256

    def __init__(self, causal_lm: nn.Module, batch_size: int, capacity: int, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool | None = None, compile_step: bool = False,
                 bucket_width: int = BUCKET_WIDTH, compile_options: dict | None = None):
        self._buckets = attention_buckets(capacity, bucket_width)
        super().__init__(causal_lm, batch_size, capacity, device, dtype, cuda_graph, compile_step=False)
        self.compile_step = compile_step
        self.fused = FusedLlamaStep(causal_lm, self.cache, compile=compile_step, compile_options=compile_options)
        self.column = torch.zeros(1, dtype=torch.long, device=self.device)

    @property
    def attention_buckets(self) -> tuple[int, ...]:
        return self._buckets

    def _disable_compile(self) -> None:
        self.fused = FusedLlamaStep(self.causal_lm, self.cache, compile=False)
        super()._disable_compile()

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._set_cache_length(self.length)  # fused steps do not advance transformers' cache lengths
        return super().prefill(embeds, padding_mask)

    def _before_step(self) -> None:
        self.column.fill_(self.length)

    def _step_body(self, bucket: int) -> torch.Tensor:
        hidden = self.fused(self.tokens, self.next_position, self.column, self.mask, bucket)
        self.next_position.add_(1)
        return hidden


class DynamicKVDecoder(KVDecoder):
    """transformers' ``DynamicCache``: no preallocation, one eager step per token (the pre-static path)."""

    def __init__(self, causal_lm: nn.Module, batch_size: int, device: torch.device):
        from transformers import DynamicCache

        super().__init__(causal_lm, batch_size, device)
        self.cache = DynamicCache(config=causal_lm.config)
        self.mask: torch.Tensor | None = None  # kept only once some column is padding

    def _extend_mask(self, padding_mask: torch.Tensor) -> None:
        if self.mask is None and bool(padding_mask.all()):
            return
        if self.mask is None:
            self.mask = torch.ones(self.batch_size, self.length, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, padding_mask.long()], dim=1)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        padding_mask, positions = self._chunk_positions(embeds, padding_mask)
        self._extend_mask(padding_mask)
        hidden = self.inner(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True).last_hidden_state
        self.next_position += padding_mask.long().sum(dim=1)
        self.length += embeds.shape[1]
        return hidden

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        embeds = self.embed(tokens[:, None])
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        hidden = self.inner(inputs_embeds=embeds, attention_mask=self.mask, position_ids=self.next_position[:, None],
                            past_key_values=self.cache, use_cache=True).last_hidden_state[:, -1]
        self.next_position += 1
        self.length += 1
        return hidden

    @torch.no_grad()
    def truncate(self, length: int) -> None:
        self._check_truncate(length)
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)  # a negative count removes that many positions
        if self.mask is not None:
            self.mask = self.mask[:, :length]


class RecomputeDecoder(KVDecoder):
    """No cache: every prefill and step re-runs the whole sequence (slow; the equivalence reference)."""

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


def make_kv_decoder(causal_lm: nn.Module, kind: str, batch_size: int, capacity: int,
                    device: torch.device | str, dtype: torch.dtype | None = None,
                    cuda_graph: bool | None = None, compile_step: bool | None = None,
                    fused_step: bool | None = None) -> KVDecoder:
    """``kind``: "static" (preallocated; CUDA graphs on CUDA unless ``cuda_graph=False``), "dynamic" or "none".

    For "static", ``fused_step`` picks the step: None = the fused step of chatterbox.model.fast_decode
    where the LLM allows it (else transformers' step, with an info message), True = fused (an error
    if the LLM does not allow it), False = transformers' step. ``compile_step``: torch.compile the
    step; None = compile the fused step on CUDA, never transformers' step.
    """
    device = torch.device(device)
    if kind == "static":
        dtype = dtype or causal_lm.get_input_embeddings().weight.dtype
        reason = unsupported_reason(causal_lm) if fused_step is not False else None
        if reason and fused_step:
            raise ValueError(f"fused_step=True, but the fused decode step does not support this LLM: {reason}")
        if reason:
            logger.info("decoding with transformers' step: the fused step does not support this LLM (%s)", reason)
        if fused_step is False or reason:
            return StaticKVDecoder(causal_lm, batch_size, capacity, device, dtype, cuda_graph, bool(compile_step))
        compile_step = device.type == "cuda" if compile_step is None else compile_step
        return FusedStaticKVDecoder(causal_lm, batch_size, capacity, device, dtype, cuda_graph, compile_step)
    if cuda_graph or compile_step or fused_step:
        raise ValueError(f"cuda_graph / compile_step / fused_step need the static KV cache, not cache={kind!r}")
    if kind == "dynamic":
        return DynamicKVDecoder(causal_lm, batch_size, device)
    if kind == "none":
        return RecomputeDecoder(causal_lm, batch_size, device)
    raise ValueError(f"unknown KV cache kind {kind!r}; expected one of {CACHE_KINDS}")


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
