"""The web demo's JSON API, over HTTP with urllib."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from chat_support import RunningDemo, build_tiny_chat_model, png_bytes, png_header_only, sample_image

UPLOAD_LIMIT = 200_000
PIXEL_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def demo(tiny_tokenizer_dir):
    from chatterbox.tokens import load_tokenizer

    model = build_tiny_chat_model(load_tokenizer(str(tiny_tokenizer_dir)))
    running = RunningDemo(model, max_upload_bytes=UPLOAD_LIMIT, max_image_pixels=PIXEL_LIMIT, max_sessions=2,
                          request_timeout=1.0)
    yield running
    running.close()


def call(demo, method: str, path: str, body=None, content_type: str = "application/json"):
    """(status, decoded JSON) of a request; error statuses are returned, not raised."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(demo.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def upload(demo, image=None) -> str:
    status, created = call(demo, "POST", "/api/sessions", png_bytes(image or sample_image(320, 240)), "image/png")
    assert status == 201, created
    return created["session"]


def test_page_is_served_locally(demo):
    assert demo.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(demo.url + "/", timeout=30) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert '<canvas id="canvas"' in page and 'id="image-input"' in page
    status, info = call(demo, "GET", "/api/info")
    assert status == 200 and info["max_upload_bytes"] == UPLOAD_LIMIT and info["max_image_pixels"] == PIXEL_LIMIT


def test_rounds_with_regions_and_boxes(demo):
    status, created = call(demo, "POST", "/api/sessions", png_bytes(sample_image(320, 240)), "image/png")
    assert status == 201 and (created["width"], created["height"]) == (320, 240)
    session = created["session"]
    status, reply = call(demo, "POST", f"/api/sessions/{session}/ask",
                         {"question": "What is <bbox>?", "boxes": [[20, 30, 120, 140]], "ground": True})
    assert status == 200, reply
    assert reply["round"] == 1 and reply["question"] == "What is <bbox>? [VG]"
    assert isinstance(reply["text"], str) and reply["stats"]["generated_tokens"] >= 1
    assert len(reply["boxes"]) >= 1 and reply["boxes"][0]["source"] == "question"
    x1, y1, x2, y2 = reply["boxes"][0]["box"]
    assert -1 <= x1 <= x2 <= 321 and -1 <= y1 <= y2 <= 241 and 0 <= reply["boxes"][0]["score"] <= 1
    status, second = call(demo, "POST", f"/api/sessions/{session}/ask", {"question": "And what else?"})
    assert status == 200 and second["round"] == 2
    assert second["stats"]["prompt_tokens"] < reply["stats"]["prompt_tokens"]  # the cache was reused
    status, _ = call(demo, "POST", f"/api/sessions/{session}/reset", {})
    assert status == 200
    status, again = call(demo, "POST", f"/api/sessions/{session}/ask",
                         {"question": "What is <bbox>?", "boxes": [[20, 30, 120, 140]], "ground": True})
    assert again["round"] == 1 and again["text"] == reply["text"] and again["boxes"] == reply["boxes"]


@pytest.mark.parametrize("request_body, message", [
    ({"question": "Compare <bbox> and <bbox>.", "boxes": [[0, 0, 10, 10]]}, "2 <bbox> token(s) but 1 box(es)"),
    ({"question": "What is <bbox>?", "boxes": [[10, 10, 500, 100]]}, "outside the 320x240 image"),
    ({"question": "What is <bbox>?", "boxes": [["a", 1, 2, 3]]}, "field 'boxes' must be a list"),
    ({"question": 42}, "field 'question' must be a string"),
    ({"question": "<image> hi"}, "question contains '<image>'"),
])
def test_bad_questions_are_refused_with_a_message(demo, request_body, message):
    session = upload(demo)
    status, reply = call(demo, "POST", f"/api/sessions/{session}/ask", request_body)
    assert status == 400 and message in reply["error"]


def test_bad_uploads_are_refused_with_a_message(demo):
    status, reply = call(demo, "POST", "/api/sessions", b"%PDF-1.4 not a picture at all", "application/pdf")
    assert status == 400 and "the uploaded file is not an image" in reply["error"]
    status, reply = call(demo, "POST", "/api/sessions", png_header_only(4000, 3000), "image/png")
    assert status == 400 and "4000x3000 = 12,000,000 pixels, more than the limit of 1,000,000" in reply["error"]
    status, reply = call(demo, "POST", "/api/sessions", os.urandom(UPLOAD_LIMIT + 1), "image/png")
    assert status == 413 and f"more than the limit of {UPLOAD_LIMIT:,} bytes" in reply["error"]
    status, reply = call(demo, "POST", "/api/sessions", b"", "image/png")
    assert status == 400 and "empty" in reply["error"]
    # few pixels, but the CLIP centre crop would scale it to 4,480,000x224: refused, not a MemoryError (500)
    status, reply = call(demo, "POST", "/api/sessions", png_bytes(sample_image(20000, 1)), "image/png")
    assert status == 400 and "20000x1 image is too thin for the CLIP centre crop" in reply["error"]


def test_protocol_errors(demo):
    status, reply = call(demo, "POST", "/api/sessions/nope/ask", {"question": "hi"})
    assert status == 404 and "unknown or expired session" in reply["error"]
    session = upload(demo)
    status, reply = call(demo, "POST", f"/api/sessions/{session}/ask", b"{not json", "application/json")
    assert status == 400 and "not valid JSON" in reply["error"]
    status, reply = call(demo, "GET", "/api/secrets")
    assert status == 404 and "no such endpoint" in reply["error"]
    # Only max_sessions=2 are kept: the oldest goes first.
    later = [upload(demo), upload(demo)]
    status, reply = call(demo, "POST", f"/api/sessions/{session}/ask", {"question": "hi"})
    assert status == 404
    status, _ = call(demo, "DELETE", f"/api/sessions/{later[1]}")
    assert status == 200 and call(demo, "POST", f"/api/sessions/{later[1]}/reset", {})[0] == 404


@pytest.mark.parametrize("sent", [b"POST /api/sessions HTT",
                                  b"POST /api/sessions HTTP/1.1\r\nContent-Length: 1000\r\n\r\nab"])
def test_a_stalled_connection_is_closed(demo, sent):
    """A client that stops sending (mid-headers or mid-upload) loses its connection after the request timeout
    instead of holding a server thread forever."""
    import socket
    import time

    host, port = demo.server.server_address[:2]
    with socket.create_connection((host, port)) as conn:
        conn.settimeout(20)
        conn.sendall(sent)
        start = time.perf_counter()
        while conn.recv(4096):  # whatever the server answers, then the end of the stream
            pass
        assert time.perf_counter() - start < 10
    status, _ = call(demo, "GET", "/api/info")  # and the server still serves
    assert status == 200


def test_concurrent_questions_are_answered_in_turn_and_the_queue_is_visible(demo):
    import threading

    sessions = [upload(demo) for _ in range(2)]  # max_sessions=2
    status, queue = call(demo, "GET", "/api/queue")
    assert status == 200 and queue["waiting"] == 0 and not queue["running"]
    replies = {}

    def ask(session):
        replies[session] = call(demo, "POST", f"/api/sessions/{session}/ask", {"question": "What is it?"})

    threads = [threading.Thread(target=ask, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(status == 200 for status, _ in replies.values())
    waits = sorted(reply["queue"]["ahead_at_arrival"] for _, reply in replies.values())
    assert waits[0] == 0 and all(reply["queue"]["waited_s"] >= 0 for _, reply in replies.values())


def test_a_full_queue_answers_503_and_the_session_stays(demo):
    session = upload(demo)
    queue = demo.service.queue
    queue.max_waiting = 0
    try:
        with queue.turn():  # the model is busy with someone else's request
            status, reply = call(demo, "POST", f"/api/sessions/{session}/ask", {"question": "What is it?"})
    finally:
        queue.max_waiting = 16
    assert status == 503 and "the model is busy" in reply["error"]
    status, reply = call(demo, "POST", f"/api/sessions/{session}/ask", {"question": "What is it?"})
    assert status == 200 and reply["round"] == 1
