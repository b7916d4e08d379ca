"""Talking to a ChatterBox model about one image: a multi-round session with a KV cache (``session``),
box rendering (``draw``), a terminal chat (``cli``) and a small web demo (``web``).

    chat = model.chat_session("photo.jpg")     # a chatterbox.serve.ChatSession
    reply = chat.ask("What is <bbox> holding?", boxes=[[10, 20, 200, 310]])
    reply.text, reply.boxes_xyxy_abs, reply.scores
"""
from __future__ import annotations

_LAZY = {
    "ChatSession": "chatterbox.serve.session",
    "ChatReply": "chatterbox.serve.session",
    "ChatInputError": "chatterbox.serve.session",
    "open_image": "chatterbox.serve.session",
    "draw_boxes": "chatterbox.serve.draw",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chatterbox.serve' has no attribute {name!r}")


__all__ = list(_LAZY)
