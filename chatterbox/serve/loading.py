"""Model loading shared by the chat CLI and the web demo: config -> device, dtype and weights."""
from __future__ import annotations

import argparse
import logging

import torch

from chatterbox.config import add_config_arguments, config_from_args
from chatterbox.distributed import DTYPES, resolve_device, resolve_dtype
from chatterbox.model.quantization import add_quantization_argument
from chatterbox.serve.session import PromptOptions

logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", default="",
                        help="export directory written by ChatterBox.save_pretrained, or its Hub id (default: the "
                             "base weights the config points at, random where a path is empty)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="weights dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    add_quantization_argument(parser)


def load_chat_model(args: argparse.Namespace):
    """(model, config, prompt options) from parsed ``add_model_arguments`` arguments."""
    from chatterbox.model.chatterbox import ChatterBox

    cfg = config_from_args(args)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = ChatterBox.from_pretrained(args.checkpoint, dtype=dtype, device=device,
                                           quantization=args.quantization)
    else:
        logger.warning("no --checkpoint: using the base weights of config %r (random where a path is empty)",
                       args.config)
        model = ChatterBox.build(cfg.model, dtype=dtype, device=device, verbose=False,
                                 quantization=args.quantization)
    return model.eval(), cfg, PromptOptions.from_data_config(cfg.data)
