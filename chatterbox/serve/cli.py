"""Chat about an image in a terminal.

    python -m chatterbox.serve.cli --config 13b_stage2 --checkpoint export/ --image photo.jpg --save-image out.png

Type a question per round. Each `<bbox>` in it asks for a box, typed as four numbers (x1 y1 x2 y2 in
pixels of the image); put `[VG]` in a question (or start with --ground) to get a box back. Commands:
/reset (forget the dialogue), /quit (or Ctrl-D), /help.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from chatterbox.tokens import BBOX_TOKEN, VG_TOKEN

HELP = f"""Commands: /reset forgets the dialogue, /quit leaves (Ctrl-D too), /help shows this.
Put {BBOX_TOKEN} in a question to point at a region: you are then asked for its box, four numbers
x1 y1 x2 y2 in pixels. Put {VG_TOKEN} in a question to get a box back."""

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_box(text: str) -> list[float]:
    """"10 20 110 220", "10,20,110,220" or "[10, 20, 110, 220]" -> [10.0, 20.0, 110.0, 220.0]."""
    stripped = text.strip().strip("[]()")
    parts = [p for p in re.split(r"[\s,]+", stripped) if p]
    if len(parts) != 4 or not all(re.fullmatch(_NUMBER, p) for p in parts):
        raise ValueError(f"expected four numbers x1 y1 x2 y2, got {text.strip()!r}")
    return [float(p) for p in parts]


def build_parser() -> argparse.ArgumentParser:
    from chatterbox.serve.loading import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="the image to talk about")
    parser.add_argument("--save-image", default="",
                        help="after each round with boxes, write the image with the round's regions and "
                             "predicted boxes drawn to this file")
    parser.add_argument("--ground", action="store_true", help=f"append {VG_TOKEN} to every question")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="reply length limit (default: chat.max_new_tokens of the config)")
    return parser


def _read(prompt: str) -> str:
    sys.stdout.flush()
    return input(prompt)


def _ask_boxes(count: int, width: int, height: int) -> list[list[float]]:
    boxes = []
    while len(boxes) < count:
        raw = _read(f"  box {len(boxes) + 1}/{count} for {BBOX_TOKEN} (x1 y1 x2 y2, pixels of the "
                    f"{width}x{height} image)> ")
        try:
            boxes.append(parse_box(raw))
        except ValueError as e:
            print(f"  error: {e}")
    return boxes


def run(args: argparse.Namespace) -> int:
    from chatterbox.serve.draw import draw_round
    from chatterbox.serve.loading import load_chat_model
    from chatterbox.serve.session import ChatInputError, ChatSession, open_image

    try:  # the image first: a wrong path should not wait for the model
        image = open_image(args.image, max_image_pixels=None)
    except ChatInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, cfg, options = load_chat_model(args)
    max_new_tokens = args.max_new_tokens or cfg.chat.max_new_tokens
    chat = ChatSession(model, image, options=options, max_new_tokens=max_new_tokens,
                       box_threshold=cfg.model.vision.box_threshold, max_image_pixels=None)
    print(f"ChatterBox is looking at {args.image} ({chat.width}x{chat.height}). /help for help.")
    while True:
        try:
            question = _read("you> ").strip()
        except EOFError:
            print()
            break
        if not question:
            continue
        if question in ("/quit", "/exit"):
            break
        if question == "/help":
            print(HELP)
            continue
        if question == "/reset":
            chat.reset()
            print("(dialogue cleared)")
            continue
        try:
            boxes = _ask_boxes(question.count(BBOX_TOKEN), chat.width, chat.height)
            reply = chat.ask(question, boxes, ground=args.ground)
        except EOFError:
            print()
            break
        except ChatInputError as e:
            print(f"error: {e}")
            continue
        print(f"ChatterBox> {reply.text}")
        for k, (box, score) in enumerate(zip(reply.boxes_as_lists(), reply.scores.tolist())):
            source = "question" if k < reply.vg_in_question else "reply"
            found = "" if reply.found[k] else " (nothing above the score threshold: fallback box)"
            print(f"  box {k + 1} ({VG_TOKEN} in the {source}): {box} score {score:.3f}{found}")
        if args.save_image and (boxes or len(reply.boxes_xyxy_abs)):
            draw_round(chat.image, chat.history[-1].region_boxes_xyxy_abs, reply).save(args.save_image)
            print(f"  (image with boxes saved to {args.save_image})")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
