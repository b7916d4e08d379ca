"""A fused one-token decode step over a LLaMA LLM's own weights (the static KV decoder's default step).

Why: transformers' LLaMA layer launches ~50 small kernels per token (RMSNorm in six element-wise ops,
three q/k/v and two gate/up GEMVs, RoPE, LoRA as separate matmuls, attention masked over every cache
column). At batch 1 a step should cost little more than reading the weights once; those kernels doubled
it. Per layer this step runs

    residual add + RMSNorm -> one GEMV over the fused q|k|v weight -> RoPE and K/V into the static cache
    -> attention over the first ``bucket`` cache columns (SDPA, faster than the same attention as
       compiled fp32 reductions: docs/BENCHMARKS.md, chat latency)
    -> o_proj GEMV -> residual add + RMSNorm -> one GEMV over the fused gate|up weight -> SiLU * up
    -> down_proj GEMV (its residual add is done by the next layer's first kernel)

and, with ``compile=True``, the two halves around the attention are ``torch.compile``d so inductor fuses
the element-wise work into a few kernels per half (compiled once per process: every layer calls the
same two functions with its own weights as arguments). The GEMVs are cuBLAS calls (inductor's
``coordinate_descent_tuning`` option writes them as tuned Triton reductions instead, gpt-fast's recipe:
barely faster for a much longer first compilation, docs/BENCHMARKS.md, chat latency).

Weights: :func:`fuse_projection_weights` makes the q/k/v (and gate/up) parameters views into one
contiguous tensor per layer, so one GEMV reads them while parameter names, values, ``state_dict`` and
memory stay as they were (in-place updates such as peft's ``merge_adapter`` keep the views).

LoRA: merged adapters are already in the weights; unmerged active adapters are applied as the same
low-rank terms peft adds (``B(A(x)) * scaling``, no dropout: decoding is inference). DoRA and other
LoRA variants are not supported (:func:`unsupported_reason` says so and the caller keeps the
transformers step).

Eager (CPU tests), the numbers follow transformers' LlamaModel operation by operation, so greedy tokens
match its step and hidden states agree to float rounding. Compiled, inductor keeps element-wise
intermediates in fp32 and cuBLAS adds the o_proj residual in its epilogue, so bf16 hidden states
differ by rounding (13b shapes, random weights: 16 of 16 greedy tokens equal to transformers' step).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: RoPE types whose inverse frequencies do not depend on the sequence length (computed once here).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# One LoRA adapter of a projection: (A weight [r, in], B weight [out, r], B bias or None, scaling).
Adapter = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]


# ---------------------------------------------------------------------------------------------------
# model inspection
def _base_linear(module: nn.Module) -> nn.Module:
    """The plain Linear under a peft LoRA wrapper (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _projections(layer: nn.Module) -> dict[str, nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}


def _adapter_problem(module: nn.Module) -> str | None:
    for name in _active_adapter_names(module):
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            return f"LoRA adapter {name!r} is a variant (e.g. DoRA)"
    if getattr(module, "fan_in_fan_out", False):
        return "a LoRA layer with fan_in_fan_out"
    return None


def unsupported_reason(causal_lm: nn.Module) -> str | None:
    """Why the fused step cannot run this LLM (None: it can)."""
    config = causal_lm.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} (the fused MLP is SiLU-gated)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projections with biases"
    rotary = getattr(causal_lm.model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"RoPE type {rope_type!r} (inverse frequencies must not depend on the length)"
    for index, layer in enumerate(causal_lm.model.layers):
        try:
            projections = _projections(layer)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        except AttributeError as e:
            return f"layer {index} is not a LLaMA decoder layer ({e})"
        for name, module in projections.items():
            base = _base_linear(module)
            if not isinstance(base, nn.Linear) or base.bias is not None:
                return f"layer {index} {name}_proj is not a bias-free nn.Linear"
            if not base.weight.is_floating_point():
                return f"layer {index} {name}_proj holds quantised weights ({base.weight.dtype})"
            problem = _adapter_problem(module)
            if problem:
                return f"layer {index} {name}_proj: {problem}"
        if norms[0].shape != norms[1].shape:
            return f"layer {index}: unexpected norm shapes"
    return None


def _active_adapter_names(module: nn.Module) -> list[str]:
    """Adapters peft's forward would add to this projection (none when disabled or merged)."""
    if not hasattr(module, "lora_A") or module.disable_adapters or module.merged:
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def lora_adapters(module: nn.Module) -> tuple[Adapter, ...]:
    """The unmerged, active LoRA adapters of a projection, in peft's order."""
    def detached(tensor):
        return None if tensor is None else tensor.detach()

    return tuple((module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach(),
                  detached(module.lora_B[name].bias), float(module.scaling[name]))
                 for name in _active_adapter_names(module))


# ---------------------------------------------------------------------------------------------------
# fused weights as views
def _fused_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor ``weights`` are consecutive row blocks of, if they already are."""
    first = weights[0]
    start = first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    for weight in weights:
        if (weight.dtype != first.dtype or weight.device != first.device or weight.shape[1:] != first.shape[1:]
                or not weight.is_contiguous() or weight.untyped_storage().data_ptr() != storage
                or weight.data_ptr() != start):
            return None
        start += weight.numel() * weight.element_size()
    rows = sum(weight.shape[0] for weight in weights)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


@torch.no_grad()
def fuse_weights(linears: list[nn.Module]) -> torch.Tensor:
    """One [sum(out), in] tensor whose row blocks *are* the linears' weights (re-pointed once, no copy kept)."""
    weights = [linear.weight for linear in linears]
    fused = _fused_view(weights)
    if fused is not None:
        return fused
    fused = torch.cat([weight.detach() for weight in weights], dim=0)
    start = 0
    for weight in weights:
        rows = weight.shape[0]
        weight.data = fused[start:start + rows]  # the same Parameter object, now a view
        start += rows
    return fused


def fuse_projection_weights(causal_lm: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the fused q|k|v and gate|up weights (see :func:`fuse_weights`)."""
    fused = []
    for layer in causal_lm.model.layers:
        p = _projections(layer)
        fused.append((fuse_weights([_base_linear(p[n]) for n in ("q", "k", "v")]),
                      fuse_weights([_base_linear(p[n]) for n in ("gate", "up")])))
    return fused


# ---------------------------------------------------------------------------------------------------
# the step, as plain functions of tensors (what torch.compile sees)
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in fp32, the weight multiplied in the model dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _with_lora(out: torch.Tensor, x: torch.Tensor, adapters: tuple[Adapter, ...]) -> torch.Tensor:
    result = out
    for a, b, b_bias, scaling in adapters:
        result = result + F.linear(F.linear(x.to(a.dtype), a), b, b_bias) * scaling
    return result.to(out.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attention_input(residual, delta, norm_weight, qkv_weight, q_adapters, k_adapters, v_adapters, cos, sin,
                    keys, values, column, shape: tuple[float, int, int, int]):
    """Residual add + RMSNorm + q|k|v GEMV (+ LoRA) + RoPE; k and v are written into the cache buffers
    ``keys``/``values`` [B,kv_heads,capacity,D] at ``column`` ([1] long; compiled, the write is fused
    into the RoPE kernel). Returns the new residual [B,H] and q [B,heads,1,D]."""
    eps, heads, kv_heads, head_dim = shape
    batch = residual.shape[0]
    residual = residual + delta
    normed = _rms_norm(residual, norm_weight, eps)
    q, k, v = F.linear(normed, qkv_weight).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q = _with_lora(q, normed, q_adapters).view(batch, heads, 1, head_dim)
    k = _with_lora(k, normed, k_adapters).view(batch, kv_heads, 1, head_dim)
    v = _with_lora(v, normed, v_adapters).view(batch, kv_heads, 1, head_dim)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    keys.index_copy_(2, column, _rotate(k, cos, sin))
    values.index_copy_(2, column, v)
    return residual, _rotate(q, cos, sin)


def attention_output_and_mlp(residual, attn, o_weight, o_adapters, norm_weight, gate_up_weight, gate_adapters,
                             up_adapters, down_weight, down_adapters, eps: float):
    """o_proj + residual add + RMSNorm + gate|up GEMV + SiLU*up + down_proj. Returns the residual
    before the MLP and the MLP output (added to it by the next layer)."""
    attn = attn.reshape(attn.shape[0], -1)
    residual = residual + _with_lora(F.linear(attn, o_weight), attn, o_adapters)
    normed = _rms_norm(residual, norm_weight, eps)
    gate, up = F.linear(normed, gate_up_weight).chunk(2, dim=-1)
    gate = _with_lora(gate, normed, gate_adapters)
    up = _with_lora(up, normed, up_adapters)
    mlp = F.silu(gate) * up
    return residual, _with_lora(F.linear(mlp, down_weight), mlp, down_adapters)


@functools.cache
def _compiled(fn, options: tuple[tuple[str, object], ...]):
    """One compiled version per function, inductor options and process (it serves every layer and decoder)."""
    return torch.compile(fn, fullgraph=True, options=dict(options) or None)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    q_adapters: tuple[Adapter, ...]
    k_adapters: tuple[Adapter, ...]
    v_adapters: tuple[Adapter, ...]
    o: torch.Tensor
    o_adapters: tuple[Adapter, ...]
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_adapters: tuple[Adapter, ...]
    up_adapters: tuple[Adapter, ...]
    down: torch.Tensor
    down_adapters: tuple[Adapter, ...]
    keys: torch.Tensor     # the static cache's [B, kv_heads, capacity, D] buffers
    values: torch.Tensor


class FusedLlamaStep:
    """One decode step of ``causal_lm`` on a transformers ``StaticCache`` (its key/value buffers).

    Reads the weights and LoRA state when built: a model changed afterwards (LoRA merged or unmerged,
    moved, cast) needs a new step, like a captured CUDA graph does.
    """

    def __init__(self, causal_lm: nn.Module, cache, compile: bool = False, compile_options: dict | None = None):
        reason = unsupported_reason(causal_lm)
        if reason:
            raise ValueError(f"the fused decode step does not support this LLM: {reason}")
        config, inner = causal_lm.config, causal_lm.model
        self.embed = causal_lm.get_input_embeddings()
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.final_norm = inner.norm.weight.detach()
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scaling = float(inner.rotary_emb.attention_scaling)
        self.layers = []
        for layer, (qkv, gate_up), cache_layer in zip(inner.layers, fuse_projection_weights(causal_lm), cache.layers):
            p = _projections(layer)
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm.weight.detach(), qkv=qkv, q_adapters=lora_adapters(p["q"]),
                k_adapters=lora_adapters(p["k"]), v_adapters=lora_adapters(p["v"]),
                o=_base_linear(p["o"]).weight.detach(), o_adapters=lora_adapters(p["o"]),
                post_norm=layer.post_attention_layernorm.weight.detach(), gate_up=gate_up,
                gate_adapters=lora_adapters(p["gate"]), up_adapters=lora_adapters(p["up"]),
                down=_base_linear(p["down"]).weight.detach(), down_adapters=lora_adapters(p["down"]),
                keys=cache_layer.keys, values=cache_layer.values))
        self.compiled = compile
        options = tuple(sorted((compile_options or {}).items()))
        self._attention_input = _compiled(attention_input, options) if compile else attention_input
        self._attention_output_and_mlp = (_compiled(attention_output_and_mlp, options) if compile
                                          else attention_output_and_mlp)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B,D] of each row's position, as transformers' LlamaRotaryEmbedding computes them."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.rope_scaling).to(dtype), (angles.sin() * self.rope_scaling).to(dtype)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
                 padding_mask: torch.Tensor, bucket: int) -> torch.Tensor:
        """Feed ``tokens`` [B] at rotary ``positions`` [B]; their keys/values go to cache column ``column``
        ([1] long), attention reads columns ``< bucket`` that ``padding_mask`` [B, >=bucket] marks real and
        that are ``<= column``. Returns the final hidden state [B,H] (after the last RMSNorm)."""
        residual = self.embed(tokens)
        dtype = residual.dtype
        cos, sin = self._rotary(positions, dtype)
        columns = torch.arange(bucket, device=column.device)
        visible = padding_mask[:, :bucket] & (columns <= column)[None, :]
        attn_bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, float("-inf"))[:, None, None, :]
        delta = torch.zeros_like(residual)
        shape = (self.eps, self.heads, self.kv_heads, self.head_dim)
        for layer in self.layers:
            residual, q = self._attention_input(residual, delta, layer.input_norm, layer.qkv, layer.q_adapters,
                                                layer.k_adapters, layer.v_adapters, cos, sin, layer.keys,
                                                layer.values, column, shape)
            attn = F.scaled_dot_product_attention(q, layer.keys[:, :, :bucket], layer.values[:, :, :bucket],
                                                  attn_mask=attn_bias, enable_gqa=self.kv_heads != self.heads)
            residual, delta = self._attention_output_and_mlp(
                residual, attn, layer.o, layer.o_adapters, layer.post_norm, layer.gate_up, layer.gate_adapters,
                layer.up_adapters, layer.down, layer.down_adapters, self.eps)
        return _rms_norm(residual + delta, self.final_norm, self.eps)
