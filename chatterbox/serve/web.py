"""The browser demo, a Gradio app: upload an image, mark regions by dragging on it (or type them), chat
over several rounds with the reply streamed, see the predicted boxes and their scores drawn on the image.

    python -m chatterbox.serve.web --config 13b_stage2 --checkpoint export/      # http://127.0.0.1:7860

Bound to 127.0.0.1 by default (chat.host); the demo has no authentication, so expose it only behind
something that has. Each browser tab (or ``gradio_client.Client``) has its own dialogue, whose KV cache
is kept across rounds; the model answers one request at a time, the others wait in Gradio's queue.
The programmatic API is Gradio's: endpoints ``/upload``, ``/ask`` and ``/reset`` (docs/chat.md).
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import os
import queue
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from chatterbox.serve.cli import parse_box
from chatterbox.serve.draw import draw_round
from chatterbox.serve.session import ChatInputError, ChatSession, PromptOptions, open_image
from chatterbox.tokens import BBOX_TOKEN, VG_TOKEN

MAX_QUESTION_CHARS = 4000
MAX_REGIONS_CHARS = 64 * 1024
PREVIEW_SIDE = 1024   # the picture in the page is the image shrunk to this many pixels a side at most
MAX_QUEUED = 32       # requests waiting for the model beyond this are refused (Gradio's "queue is full")
MODEL = "model"       # concurrency group of the events that run the model: one at a time

# Dragging on the picture marks a region. The box goes to the server as fractions of the picture (which
# may be a shrunk copy) through the hidden button #add-dragged-region; the server turns it into pixels.
DRAG_TO_MARK_REGIONS_JS = """
() => {
  const MIN_SIDE = 3;  // CSS pixels: a click is not a region
  const outline = document.createElement("div");
  outline.id = "drag-outline";
  outline.style.cssText = "position:fixed;border:2px dashed #ffc800;pointer-events:none;display:none;z-index:1000";
  document.body.appendChild(outline);
  let drag = null;
  // Where the picture is drawn inside its <img> box (object-fit keeps the aspect ratio and centres it).
  const pictureRect = (img) => {
    const box = img.getBoundingClientRect();
    let scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    if (getComputedStyle(img).objectFit === "scale-down") scale = Math.min(scale, 1);
    const width = img.naturalWidth * scale, height = img.naturalHeight * scale;
    return { left: box.left + (box.width - width) / 2, top: box.top + (box.height - height) / 2, width, height };
  };
  const inside = (event, r) => [Math.min(Math.max(event.clientX, r.left), r.left + r.width),
                                Math.min(Math.max(event.clientY, r.top), r.top + r.height)];
  const corners = (event) => {
    const [x, y] = inside(event, drag.rect);
    return [Math.min(drag.x, x), Math.min(drag.y, y), Math.max(drag.x, x), Math.max(drag.y, y)];
  };
  document.addEventListener("mousedown", (event) => {
    const img = event.target.closest ? event.target.closest("#picture img") : null;
    if (!img || !img.naturalWidth || event.button !== 0) return;
    event.preventDefault();  // not the browser's own dragging of images
    const rect = pictureRect(img), [x, y] = inside(event, rect);
    drag = { rect, x, y };
  });
  document.addEventListener("mousemove", (event) => {
    if (!drag) return;
    const [x1, y1, x2, y2] = corners(event);
    Object.assign(outline.style, { display: "block", left: `${x1}px`, top: `${y1}px`,
                                   width: `${x2 - x1}px`, height: `${y2 - y1}px` });
  });
  document.addEventListener("mouseup", (event) => {
    if (!drag) return;
    const [x1, y1, x2, y2] = corners(event), r = drag.rect;
    drag = null;
    outline.style.display = "none";
    if (x2 - x1 < MIN_SIDE || y2 - y1 < MIN_SIDE) return;
    window.chatterboxDraggedRegion = JSON.stringify([(x1 - r.left) / r.width, (y1 - r.top) / r.height,
                                                     (x2 - r.left) / r.width, (y2 - r.top) / r.height]);
    document.getElementById("add-dragged-region").click();
  });
}
"""
READ_DRAGGED_REGION_JS = "(dragged, ...rest) => [window.chatterboxDraggedRegion, ...rest]"
CSS = "#picture img { cursor: crosshair; user-select: none; }"


@dataclass
class ImageDialogue:
    """One browser session's dialogue (kept in a gr.State): the ChatSession, whose KV cache lasts across
    rounds, and the picture the page shows, the image shrunk to PREVIEW_SIDE."""

    chat: ChatSession
    preview: Image.Image

    @property
    def preview_scale(self) -> float:
        return self.preview.width / self.chat.width


def parse_regions(text: str, *, skip_unreadable: bool = False) -> list[list[float]]:
    """The regions field: a box per line, x1 y1 x2 y2 in image pixels (blank lines are skipped)."""
    boxes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            boxes.append(parse_box(line))
        except ValueError as e:
            if not skip_unreadable:
                raise ChatInputError(f"regions, line {number}: {e}") from None
    return boxes


def _format_box(box) -> str:
    return " ".join(f"{round(float(v), 1):g}" for v in box)


def refused(error: ChatInputError, skipped_before: int, skipped_after: int) -> tuple:
    """A handler's answer to input it cannot use: the message in a toast, in the status box and as
    ``{"error": message}`` in the data slot; every other output (the dialogue's state too) stays as it was.

    Not gr.Error: that would put every output of the event in an error state, hiding the dialogue."""
    message = str(error)
    gr.Warning(html.escape(message))  # the toast shows HTML: escaped, "<bbox>" stays visible
    return (*[gr.skip()] * skipped_before, {"error": message}, f"Refused: {message}", *[gr.skip()] * skipped_after)


def _check_length(field: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ChatInputError(f"the {field} is longer than {limit} characters")


def chat_messages(chat: ChatSession) -> list[dict]:
    """The dialogue as gr.Chatbot messages: each question with its regions, each reply with its boxes."""
    messages = []
    for turn in chat.history:
        regions = [f"region {k + 1}: [{', '.join(f'{v:g}' for v in box)}]"
                   for k, box in enumerate(turn.region_boxes_xyxy_abs.tolist())]
        messages.append({"role": "user", "content": "\n".join([turn.question, *regions])})
        messages.append({"role": "assistant", "content": "\n".join([turn.reply.text, *turn.reply.box_lines()])})
    return messages


def reply_data(chat: ChatSession) -> dict:
    """The last round as data: the reply, the question as the model saw it, the boxes and the timings."""
    turn = chat.history[-1]
    reply = turn.reply
    scores = reply.scores.tolist()
    return {
        "text": reply.text,
        "question": turn.question,
        "round": len(chat.history),
        "boxes": [{"box": box, "score": round(scores[k], 4), "found": bool(reply.found[k]),
                   "source": reply.box_source(k)} for k, box in enumerate(reply.boxes_as_lists())],
        "stats": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(reply.stats).items()},
    }


class ChatDemo:
    """The Gradio app around one model: ``ChatDemo(model, ...).launch()``."""

    def __init__(self, model, options: PromptOptions | None = None, *, max_new_tokens: int = 512,
                 box_threshold: float | None = None, max_upload_bytes: int = 20 * 1024 * 1024,
                 max_image_pixels: int = 40_000_000, max_sessions: int = 8):
        self.model = model
        self.options = options or PromptOptions()
        self.max_new_tokens = max_new_tokens
        self.box_threshold = box_threshold
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self.max_sessions = max_sessions
        # Besides the queue's one-at-a-time: a reply whose page went away still runs to its end.
        self._model_lock = threading.Lock()
        self.blocks = self._build()
        self.blocks.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)

    # -- the page ----------------------------------------------------------------------------------
    def _build(self) -> gr.Blocks:
        with gr.Blocks(title="ChatterBox", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
            dialogue = gr.State(None)
            gr.Markdown("# ChatterBox\nUpload an image, drag on it to mark a region (or type one), ask about "
                        f"it: each `{BBOX_TOKEN}` in a question is the next region of the list; tick "
                        f"**ask for a box** to get one back (`{VG_TOKEN}`).")
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Image", file_types=["image"], type="filepath", height=120,
                                     elem_id="upload")
                    picture = gr.Image(label="Picture", interactive=False, format="png",
                                       buttons=["download", "fullscreen"], elem_id="picture")
                    regions = gr.Textbox(label="Regions", info="x1 y1 x2 y2 per line, in pixels of the image",
                                         lines=3, elem_id="regions")
                    clear_regions = gr.Button("Clear regions", size="sm", elem_id="clear-regions")
                    # In the page but not shown: what the drag script triggers (the box rides in its js).
                    dragged = gr.Textbox(visible="hidden", elem_id="dragged-region")
                    add_dragged = gr.Button(visible="hidden", elem_id="add-dragged-region")
                with gr.Column():
                    chatbot = gr.Chatbot(label="Dialogue", render_markdown=False, feedback_options=None,
                                         buttons=["copy", "copy_all"], height=420, elem_id="dialogue")
                    question = gr.Textbox(label="Question", placeholder=f"Ask about the image; {BBOX_TOKEN} = a region",
                                          elem_id="question")
                    with gr.Row():
                        insert_bbox = gr.Button(f"Insert {BBOX_TOKEN}", elem_id="insert-bbox")
                        ground = gr.Checkbox(label=f"ask for a box ({VG_TOKEN})", elem_id="ground")
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        reset = gr.Button("Reset dialogue", elem_id="reset")
                    status = gr.Textbox(label="Status", value="Upload an image to start.", interactive=False,
                                        elem_id="status")
                    with gr.Accordion("Last reply as data", open=False):
                        last_reply = gr.JSON(label="Last reply", elem_id="last-reply")

            # Every endpoint answers (dialogue, picture, last reply, status, regions, ...), in that order. The
            # model's events run one at a time; "minimal" progress leaves the dialogue visible meanwhile.
            shown = [chatbot, picture, last_reply, status, regions]
            model_event = dict(concurrency_id=MODEL, concurrency_limit=1, show_progress="minimal")
            upload.upload(self.upload, [upload], [dialogue, *shown], api_name="upload", **model_event)
            upload.clear(lambda: (None, [], None, None, "Upload an image to start.", ""), None, [dialogue, *shown],
                         api_visibility="private")
            gr.on([send.click, question.submit], self.ask, [question, regions, ground, dialogue], [*shown, question],
                  api_name="ask", **model_event)
            reset.click(self.reset, [dialogue], shown, api_name="reset", **model_event)
            regions.input(self.picture, [regions, dialogue], [picture], trigger_mode="always_last",
                          show_progress="hidden", api_visibility="private")
            clear_regions.click(lambda d: ("", self.picture("", d)), [dialogue], [regions, picture],
                                show_progress="hidden", api_visibility="private")
            add_dragged.click(self.add_dragged_region, [dragged, regions, dialogue], [regions, picture],
                              js=READ_DRAGGED_REGION_JS, show_progress="hidden", api_visibility="private")
            insert_bbox.click(None, [question], [question], js=f"(question) => question + '{BBOX_TOKEN}'")
        return blocks

    def launch(self, host: str = "127.0.0.1", port: int = 7860) -> str:
        """Start serving in a background thread; returns the page's address."""
        self.blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                           show_error=False, max_file_size=self.max_upload_bytes,
                           state_session_capacity=self.max_sessions, enable_monitoring=False, mcp_server=False,
                           ssr_mode=False, run_history=False, footer_links=["api"], js=DRAG_TO_MARK_REGIONS_JS,
                           css=CSS)
        return self.blocks.local_url

    def close(self) -> None:
        self.blocks.close(verbose=False)

    # -- event handlers ------------------------------------------------------------------------------
    def _dialogue(self, dialogue: ImageDialogue | None) -> ImageDialogue:
        if dialogue is None:
            raise ChatInputError("no image in this session: upload one first (the demo keeps the "
                                 f"{self.max_sessions} most recently used sessions)")
        return dialogue

    def picture(self, regions_text: str, dialogue: ImageDialogue | None) -> Image.Image | None:
        """The image with the regions being typed (else the last question's) and the last reply's boxes."""
        if dialogue is None:
            return None
        chat = dialogue.chat
        # What can be drawn of a region being typed: its part inside the image.
        pending = [[min(max(v, 0), side) for v, side in zip(box, (chat.width, chat.height) * 2)]
                   for box in parse_regions(regions_text, skip_unreadable=True)]
        pending = [box for box in pending if box[2] > box[0] and box[3] > box[1]]
        last = chat.history[-1] if chat.history else None
        regions = pending or (last.region_boxes_xyxy_abs if last else [])
        return draw_round(dialogue.preview, regions, last.reply if last else None, dialogue.preview_scale)

    def upload(self, image: str):
        """A new dialogue about the uploaded image (its size and pixel count checked before decoding)."""
        try:
            if not image:
                raise ChatInputError("no file was uploaded")
            size = os.path.getsize(image)
            if size > self.max_upload_bytes:  # files Gradio fetched from a URL skip its upload limit
                raise ChatInputError(f"the uploaded file is {size:,} bytes, more than the limit of "
                                     f"{self.max_upload_bytes:,} bytes")
            decoded = open_image(Path(image).read_bytes(), self.max_image_pixels, what="the uploaded file")
            with self._model_lock:
                chat = ChatSession(self.model, decoded, options=self.options, max_new_tokens=self.max_new_tokens,
                                   box_threshold=self.box_threshold, max_image_pixels=None)
        except ChatInputError as e:
            return refused(e, skipped_before=3, skipped_after=1)
        preview = decoded.copy()
        preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        dialogue = ImageDialogue(chat, preview)
        return (dialogue, [], self.picture("", dialogue), None,
                f"Image {chat.width}×{chat.height}: drag on it to mark a region, then ask.", "")

    def ask(self, question: str, regions: str, ground: bool, dialogue: ImageDialogue | None):
        """One round, streamed: (dialogue, picture, last reply as data, status, regions, question)."""
        question, regions = question or "", regions or ""  # the API may send None for a text field
        try:
            chat = self._dialogue(dialogue).chat
            _check_length("question", question, MAX_QUESTION_CHARS)
            _check_length("regions field", regions, MAX_REGIONS_CHARS)
            boxes = parse_regions(regions)
        except ChatInputError as e:
            yield refused(e, skipped_before=2, skipped_after=2)
            return
        updates: queue.Queue = queue.Queue()

        def answer():
            try:
                with self._model_lock:
                    updates.put(chat.ask(question, boxes, ground=bool(ground), on_text=updates.put))
            except BaseException as e:  # handed to the request's thread, which raises it
                updates.put(e)

        threading.Thread(target=answer, name="chatterbox-ask", daemon=True).start()
        while isinstance(update := updates.get(), str):
            streamed = [{"role": "user", "content": question}, {"role": "assistant", "content": update}]
            yield chat_messages(chat) + streamed, gr.skip(), gr.skip(), "Writing…", gr.skip(), gr.skip()
        if isinstance(update, ChatInputError):
            yield refused(update, skipped_before=2, skipped_after=2)
            return
        if isinstance(update, BaseException):
            raise update
        stats = update.stats
        yield (chat_messages(chat), self.picture("", dialogue), reply_data(chat),
               f"Round {stats.round_index}: {stats.generated_tokens} tokens in {stats.total_s:.2f} s.", "", "")

    def reset(self, dialogue: ImageDialogue | None):
        """Forget the dialogue and its KV cache; the image stays."""
        try:
            self._dialogue(dialogue).chat.reset()
        except ChatInputError as e:
            return refused(e, skipped_before=2, skipped_after=1)
        return [], self.picture("", dialogue), None, "Dialogue cleared.", ""

    def add_dragged_region(self, dragged: str, regions: str, dialogue: ImageDialogue | None):
        """Append the region dragged on the picture (fractions of it, from the page's script) in pixels."""
        if dialogue is None:
            return gr.skip(), gr.skip()
        fractions = json.loads(dragged)
        chat = dialogue.chat
        box = [f * side for f, side in zip(fractions, (chat.width, chat.height) * 2)]
        regions = regions.rstrip("\n") + ("\n" if regions.strip() else "") + _format_box(box)
        return regions, self.picture(regions, dialogue)


def main(argv=None) -> int:
    from chatterbox.serve.loading import add_model_arguments, load_chat_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default=None, help="address to bind (default: chat.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: chat.port, 7860)")
    parser.add_argument("--max-sessions", type=int, default=8,
                        help="dialogues kept (one per browser tab or API client; least recently used go)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else Gradio's start-up probes of its own URL are logged
    model, cfg, options = load_chat_model(args)
    demo = ChatDemo(model, options, max_new_tokens=cfg.chat.max_new_tokens,
                    box_threshold=cfg.model.vision.box_threshold, max_upload_bytes=cfg.chat.max_upload_bytes,
                    max_image_pixels=cfg.chat.max_image_pixels, max_sessions=args.max_sessions)
    url = demo.launch(args.host or cfg.chat.host, cfg.chat.port if args.port is None else args.port)
    print(f"ChatterBox demo on {url} (Ctrl-C stops it)", flush=True)
    try:
        demo.blocks.block_thread()
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
