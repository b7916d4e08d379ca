"""Shared helpers of the chat tests: a tiny ChatterBox with random weights and small test images."""
from __future__ import annotations

import io
import struct
import zlib

import torch
from PIL import Image, ImageDraw

def tiny_config():
    from chatterbox.config import load_config

    # The tiny preset at LLaMA's init and CLIP's 224 px centre crop in 14 px patches: the generation paths
    # these tests steer into (see build_tiny_chat_model) depend on the tokens its random weights repeat.
    return load_config("tiny_stage1", ["model.language.initializer_range=0.02", "model.clip.image_size=224",
                                       "model.clip.patch_size=14", "model.clip.resize=per_source"])


def build_tiny_chat_model(tokenizer, steer: bool = True):
    """The tiny model; ``steer`` makes greedy replies produce `[VG]` and end-of-sequence now and then.

    Random weights repeat a few tokens forever. Giving `[VG]` and `</s>` (almost) the lm_head rows of
    two such tokens makes them win some of those steps, so tests reach every generation path.
    """
    from chatterbox.model.chatterbox import ChatterBox

    torch.manual_seed(0)
    model = ChatterBox.build(tiny_config().model, tokenizer=tokenizer, verbose=False).eval()
    if steer:
        ids = model.token_ids
        with torch.no_grad():
            head = model.causal_lm.lm_head.weight
            head[ids.vg] = head[715] * 1.05
            head[ids.eos] = head[756] * 1.05
    return model


def sample_image(width: int = 320, height: int = 240) -> Image.Image:
    """A non-square picture with a few shapes (non-square so the CLIP centre crop matters)."""
    img = Image.new("RGB", (width, height), (230, 230, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle([20, 30, 120, 140], fill=(200, 30, 30))
    draw.ellipse([180, 60, 300, 200], fill=(30, 30, 200))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming ``width`` x ``height`` and a truncated IDAT: a decompression-bomb
    stand-in that costs nothing to build (a reader that checks the header never reaches the data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class RunningDemo:
    """The web demo on a free local port, served from a background thread."""

    def __init__(self, model, **limits):
        import threading

        from chatterbox.serve.web import ChatService, make_server

        request_timeout = limits.pop("request_timeout", 30.0)
        self.service = ChatService(model, max_new_tokens=limits.pop("max_new_tokens", 8), **limits)
        self.server = make_server(self.service, "127.0.0.1", 0, request_timeout)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
