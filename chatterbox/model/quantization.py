"""Low-memory inference: the language model's linear layers in 8-bit or 4-bit (bitsandbytes).

The mode is described by a transformers ``BitsAndBytesConfig`` (LLM.int8 with outlier threshold 6.0, or
NF4 with double quantisation and the model's dtype for the matmuls), as LLaVA-style projects load their
LLM. It is applied to a built ChatterBox, after its weights are loaded and before it is moved to its device
(bitsandbytes quantises a weight when it is moved): every ``nn.Linear`` of the decoder layers, the LoRA
layers' frozen base included, becomes a bitsandbytes layer. ``lm_head``, the embeddings, LoRA's own
matrices, the projector, CLIP, the region encoder and the vision branch stay as they are: they are small
or (``lm_head``, as in transformers' default) sensitive to rounding. Inference only.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

QUANTIZATION_MODES = ("none", "8bit", "4bit")

# LLM.int8 multiplies in float16 and bitsandbytes logs that cast on every matmul whose input is not float16:
# one line per layer per decoded token (100k lines for a dozen answers of the 13b model).
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_MESSAGE)


def _silence_int8_cast_notice() -> None:
    logger = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(f, _DropInt8CastNotice) for f in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


def add_quantization_argument(parser) -> None:
    """``--quantization {none,8bit,4bit}`` for the commands that load a model for inference."""
    parser.add_argument("--quantization", choices=QUANTIZATION_MODES, default="none",
                        help="the LLM's linear layers in 8-bit (LLM.int8) or 4-bit (NF4) with bitsandbytes, for "
                             "a smaller card (default: none)")


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """The ``transformers.BitsAndBytesConfig`` of ``mode`` ("8bit" or "4bit")."""
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES[1:])}, got {mode!r}")


def _quantized_linear(linear: nn.Linear, config) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data.detach()
    if config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=config.llm_int8_threshold)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=config.bnb_4bit_compute_dtype,
                                  compress_statistics=config.bnb_4bit_use_double_quant,
                                  quant_type=config.bnb_4bit_quant_type)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                                         compress_statistics=config.bnb_4bit_use_double_quant, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.detach(), requires_grad=False)
    return layer


def quantize_language_model(model: nn.Module, mode: str, device: str | torch.device) -> int:
    """Replace the decoder layers' linear layers of ``model`` (a ChatterBox on the host, weights loaded) by
    bitsandbytes layers in ``mode`` and move the model to ``device``, which quantises them. Returns the
    number of layers replaced. ``mode="none"`` only moves the model."""
    if mode == "none":
        model.to(device)
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"quantization={mode!r} needs bitsandbytes (pip install bitsandbytes)") from err
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_language_model takes the model on the host: a weight is quantised when it "
                         "is moved to its device")
    dtype = model.causal_lm.get_input_embeddings().weight.dtype
    config = bnb_config(mode, dtype)
    if config.load_in_8bit:
        _silence_int8_cast_notice()
    replaced = 0
    for layer in model.causal_lm.model.layers:
        targets = [(name, module) for name, module in layer.named_modules()
                   if type(module) is nn.Linear and ".lora_" not in f".{name}"]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, _quantized_linear(linear, config))
            replaced += 1
    model.to(device)
    model.quantization = mode
    return replaced
