"""A small web demo served by the standard library (no web framework): upload an image, draw or type
regions, chat over several rounds, see predicted boxes drawn on the image.

    python -m chatterbox.serve.web --config 13b_stage2 --checkpoint export/      # http://127.0.0.1:7860

Bound to 127.0.0.1 by default (chat.host); the demo has no authentication, so expose it only behind
something that has. JSON API (every error is ``{"error": message}`` with a 4xx/5xx status):

* ``POST /api/sessions`` body = the image file's bytes -> ``{"session": id, "width", "height"}``
  (at most chat.max_upload_bytes bytes and chat.max_image_pixels pixels, checked before decoding);
* ``POST /api/sessions/<id>/ask`` ``{"question", "boxes": [[x1,y1,x2,y2], ...], "ground": bool}`` ->
  ``{"text", "boxes": [{"box": [x1,y1,x2,y2], "score", "source": "question"|"reply"}], "round", "stats"}``;
  ``"queue": {"ahead_at_arrival", "waited_s"}`` says how long it waited for the model;
* ``POST /api/sessions/<id>/reset``; ``DELETE /api/sessions/<id>``; ``GET /api/info``;
* ``GET /api/queue`` -> ``{"running", "waiting", "max_waiting"}``. Requests take turns at the model in
  arrival order (chatterbox.serve.queue); past ``max_waiting`` waiting ones a new request gets 503.
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
from collections import OrderedDict
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from chatterbox.serve.queue import ModelQueue, QueueFull
from chatterbox.serve.session import ChatInputError, ChatSession, PromptOptions, open_image

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024
MAX_QUESTION_CHARS = 4000
# An oversized upload up to this many times the limit is read and dropped before answering 413.
DRAIN_FACTOR = 4


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ChatService:
    """The sessions of the demo: a bounded number, least recently used evicted; one model call at a time, in
    arrival order (`ModelQueue`)."""

    def __init__(self, model, options: PromptOptions | None = None, *, max_new_tokens: int = 512,
                 box_threshold: float | None = None, max_upload_bytes: int = 20 * 1024 * 1024,
                 max_image_pixels: int = 40_000_000, max_sessions: int = 8, max_waiting: int = 16):
        self.model = model
        self.options = options or PromptOptions()
        self.max_new_tokens = max_new_tokens
        self.box_threshold = box_threshold
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self.queue = ModelQueue(max_waiting)

    def info(self) -> dict:
        return {"max_upload_bytes": self.max_upload_bytes, "max_image_pixels": self.max_image_pixels,
                "max_new_tokens": self.max_new_tokens, "sessions": len(self._sessions)}

    def create(self, data: bytes) -> dict:
        image = open_image(data, self.max_image_pixels, what="the uploaded file")
        with self.queue.turn():
            session = ChatSession(self.model, image, options=self.options, max_new_tokens=self.max_new_tokens,
                                  box_threshold=self.box_threshold, max_image_pixels=None)
            session_id = secrets.token_urlsafe(12)
            self._sessions[session_id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return {"session": session_id, "width": session.width, "height": session.height}

    def _get(self, session_id: str) -> ChatSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "unknown or expired session: upload the image again")
        self._sessions.move_to_end(session_id)
        return session

    def ask(self, session_id: str, request: dict) -> dict:
        question = request.get("question")
        if not isinstance(question, str):
            raise ChatInputError("field 'question' must be a string")
        if len(question) > MAX_QUESTION_CHARS:
            raise ChatInputError(f"field 'question' is longer than {MAX_QUESTION_CHARS} characters")
        boxes = request.get("boxes") or []
        if not isinstance(boxes, list) or not all(
                isinstance(b, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
                for b in boxes):
            raise ChatInputError("field 'boxes' must be a list of [x1, y1, x2, y2] number lists")
        ground = request.get("ground", False)
        if not isinstance(ground, bool):
            raise ChatInputError("field 'ground' must be true or false")
        with self.queue.turn() as turn:
            session = self._get(session_id)
            reply = session.ask(question, boxes, ground=ground)
            round_index = len(session.history)
            question_used = session.history[-1].question
        scores = reply.scores.tolist()
        return {
            "text": reply.text,
            "question": question_used,
            "round": round_index,
            "boxes": [{"box": box, "score": round(scores[k], 4), "found": bool(reply.found[k]),
                       "source": "question" if k < reply.vg_in_question else "reply"}
                      for k, box in enumerate(reply.boxes_as_lists())],
            "stats": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(reply.stats).items()},
            "queue": {"ahead_at_arrival": turn.ahead_at_arrival, "waited_s": round(turn.waited_s, 4)},
        }

    def reset(self, session_id: str) -> dict:
        with self.queue.turn():
            self._get(session_id).reset()
        return {"ok": True}

    def delete(self, session_id: str) -> dict:
        with self.queue.turn():
            self._get(session_id)
            del self._sessions[session_id]
        return {"ok": True}


def _page() -> bytes:
    return resources.files("chatterbox.serve").joinpath("static/index.html").read_bytes()


class ChatRequestHandler(BaseHTTPRequestHandler):
    service: ChatService  # set on the subclass made by make_server
    server_version = "ChatterBoxDemo/1"

    # -- plumbing -----------------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _body(self, limit: int, what: str) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if size > limit:
            self._discard(size, limit)
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"{what} is {size:,} bytes, more than the limit of {limit:,} bytes")
        return self.rfile.read(size)

    def _discard(self, size: int, limit: int) -> None:
        """Read and drop a refused body so the client gets the answer rather than a reset connection;
        a body far beyond the limit is not read: the connection is closed instead."""
        if size > DRAIN_FACTOR * limit:
            self.close_connection = True
            return
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 16))
            if not chunk:
                break
            size -= len(chunk)

    def _json_body(self) -> dict:
        raw = self._body(MAX_JSON_BYTES, "the request")
        try:
            payload = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {e}") from None
        if not isinstance(payload, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return payload

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        try:
            if method == "GET" and path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
            if method == "GET" and parts == ["api", "info"]:
                return self._json(HTTPStatus.OK, self.service.info())
            if method == "GET" and parts == ["api", "queue"]:
                return self._json(HTTPStatus.OK, self.service.queue.status())
            if method == "POST" and parts == ["api", "sessions"]:
                data = self._body(self.service.max_upload_bytes, "the uploaded file")
                return self._json(HTTPStatus.CREATED, self.service.create(data))
            if len(parts) == 3 and parts[:2] == ["api", "sessions"] and method == "DELETE":
                return self._json(HTTPStatus.OK, self.service.delete(parts[2]))
            if len(parts) == 4 and parts[:2] == ["api", "sessions"] and method == "POST":
                if parts[3] == "ask":
                    return self._json(HTTPStatus.OK, self.service.ask(parts[2], self._json_body()))
                if parts[3] == "reset":
                    return self._json(HTTPStatus.OK, self.service.reset(parts[2]))
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: {method} {path}")
        except HTTPError as e:
            self._json(e.status, {"error": e.message})
        except ChatInputError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except QueueFull as e:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})
        except Exception:  # the message of an internal error is logged, not shown
            logger.exception("request %s %s failed", method, path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the server log"})

    def do_GET(self):  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 7860,
                request_timeout: float = 30.0) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer for ``service`` (port 0 picks a free port: see ``server.server_address``).

    A connection that sends nothing for ``request_timeout`` seconds is closed, so stalled uploads cannot
    hold the server's threads."""
    handler = type("BoundChatRequestHandler", (ChatRequestHandler,),
                   {"service": service, "timeout": request_timeout})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    from chatterbox.serve.loading import add_model_arguments, load_chat_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default=None, help="address to bind (default: chat.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: chat.port, 7860)")
    parser.add_argument("--max-sessions", type=int, default=8, help="sessions kept (least recently used go)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, cfg, options = load_chat_model(args)
    service = ChatService(model, options, max_new_tokens=cfg.chat.max_new_tokens,
                          box_threshold=cfg.model.vision.box_threshold, max_upload_bytes=cfg.chat.max_upload_bytes,
                          max_image_pixels=cfg.chat.max_image_pixels, max_sessions=args.max_sessions)
    host = args.host or cfg.chat.host
    port = cfg.chat.port if args.port is None else args.port
    server = make_server(service, host, port, cfg.chat.request_timeout_s)
    print(f"ChatterBox demo on http://{server.server_address[0]}:{server.server_address[1]}/ (Ctrl-C stops it)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
