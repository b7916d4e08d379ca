"""The web demo (Gradio) through its programmatic API, gradio_client, against a tiny model on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import time

import httpx
import pytest
from chat_support import RunningDemo, build_tiny_chat_model, png_bytes, png_header_only, sample_image
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from chatterbox.serve.draw import PALETTE, REGION_COLOUR
from chatterbox.serve.session import ChatSession

UPLOAD_LIMIT = 200_000
PIXEL_LIMIT = 1_000_000
MAX_NEW_TOKENS = 24
MAX_SESSIONS = 4
# Three rounds the tiny model answers with 4, 4 and 24 tokens: a region with a box asked for, a second
# region, and a reply long enough to stream (the decode loop reports every 8 tokens).
ROUNDS = [("What is <bbox>?", "20 30 120 140", True), ("What about <bbox>?", "200 60 300 200", False),
          ("And what else?", "", False)]
pytestmark = [  # Gradio's queue statistics use pandas options that pandas 3 deprecates.
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def model(module_tokenizer):
    return build_tiny_chat_model(module_tokenizer)


@pytest.fixture(scope="module")
def demo(model):
    running = RunningDemo(model, max_new_tokens=MAX_NEW_TOKENS, max_upload_bytes=UPLOAD_LIMIT,
                          max_image_pixels=PIXEL_LIMIT, max_sessions=MAX_SESSIONS)
    yield running
    running.close()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    sample_image(320, 240).save(path)
    return path


@pytest.fixture(scope="module")
def fresh_replies(model):
    """The ROUNDS answered by a ChatSession of its own, in-process."""
    chat = ChatSession(model, sample_image(320, 240), max_new_tokens=MAX_NEW_TOKENS)
    return [chat.ask(question, [[float(v) for v in regions.split()]] if regions else None, ground=ground)
            for question, regions, ground in ROUNDS]


@pytest.fixture()
def connect(demo, tmp_path):
    """Makes gradio_client Clients, each a session of its own like a browser tab."""
    return lambda: Client(demo.url, verbose=False, download_files=str(tmp_path / "downloads"))


@pytest.fixture()
def client(connect):
    return connect()


def upload(client, path):
    return client.predict(handle_file(str(path)), api_name="/upload")


def ask(client, question, regions="", ground=False):
    return client.predict(question, regions, ground, api_name="/ask")


def outlined(picture: Image.Image, box, colour) -> bool:
    """Whether the bottom edge of ``box`` (pixels of ``picture``) is drawn in ``colour``, give or take a pixel."""
    x, y = round((box[0] + box[2]) / 2), round(box[3])
    return any(picture.getpixel((min(max(x + dx, 0), picture.width - 1), min(max(y + dy, 0), picture.height - 1)))
               == tuple(colour) for dx in (-1, 0, 1) for dy in (-2, -1, 0, 1))


def assert_same_reply(data: dict, reply) -> None:
    assert data["text"] == reply.text
    assert [b["box"] for b in data["boxes"]] == reply.boxes_as_lists()
    assert [b["score"] for b in data["boxes"]] == pytest.approx(reply.scores.tolist(), abs=1e-4)


def test_served_on_localhost_with_three_endpoints(demo, client):
    assert demo.url.startswith("http://127.0.0.1:")
    assert not demo.app.blocks.analytics_enabled and not demo.app.blocks.share  # nothing leaves the machine
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == \
        {"/upload", "/ask", "/reset"}


def test_rounds_with_regions_boxes_streaming_and_the_cache(client, image_path, fresh_replies):
    dialogue, picture, data, status, regions = upload(client, image_path)
    assert (dialogue, data, regions) == ([], None, "") and status.startswith("Image 320×240")
    assert Image.open(picture).size == (320, 240)

    question, regions, ground = ROUNDS[0]
    dialogue, picture, data, status, regions_after, question_after = ask(client, question, regions, ground)
    assert data["round"] == 1 and data["question"] == "What is <bbox>? [VG]" and status.startswith("Round 1: ")
    assert (regions_after, question_after) == ("", "")  # consumed by the round
    assert_same_reply(data, fresh_replies[0])
    assert [b["source"] for b in data["boxes"]] == ["question", "reply"] and all(b["found"] for b in data["boxes"])
    assert dialogue[0]["content"][0]["text"] == "What is <bbox>? [VG]\nregion 1: [20, 30, 120, 140]"
    assert "box 1 ([VG] in the question): " in dialogue[1]["content"][0]["text"]
    # The picture shows the round's region and each predicted box, outlined in its colour.
    drawn = Image.open(picture).convert("RGB")
    assert outlined(drawn, [20, 30, 120, 140], REGION_COLOUR)
    assert all(outlined(drawn, box["box"], PALETTE[k]) for k, box in enumerate(data["boxes"])), data["boxes"]

    question, regions, ground = ROUNDS[1]
    data = ask(client, question, regions, ground)[2]
    assert data["round"] == 2
    assert_same_reply(data, fresh_replies[1])

    question, regions, ground = ROUNDS[2]
    job = client.submit(question, regions, ground, api_name="/ask")
    data = job.result()[2]
    assert data["round"] == 3 and data["stats"]["generated_tokens"] == MAX_NEW_TOKENS
    assert_same_reply(data, fresh_replies[2])
    # Only the new tokens were encoded: the cache was kept across rounds.
    assert data["stats"]["prompt_tokens"] < 20 < fresh_replies[0].stats.prompt_tokens
    # Streamed: after 8 and 16 tokens, the growing reply under the question being answered.
    streamed = [out[0][-1]["content"][0]["text"] for out in job.outputs() if out[3] == "Writing…"]
    assert len(streamed) == 2 and all(data["text"].startswith(text) for text in streamed)
    assert len(streamed[0]) < len(streamed[1]) < len(data["text"])


def test_reset_forgets_the_dialogue_and_keeps_the_image(client, image_path, fresh_replies):
    upload(client, image_path)
    question, regions, ground = ROUNDS[0]
    ask(client, question, regions, ground)
    ask(client, *ROUNDS[1])
    dialogue, picture, data, status, regions_after = client.predict(api_name="/reset")
    assert (dialogue, data, status, regions_after) == ([], None, "Dialogue cleared.", "")
    again = ask(client, question, regions, ground)[2]
    assert again["round"] == 1
    assert_same_reply(again, fresh_replies[0])


@pytest.mark.parametrize("question, regions, message", [
    ("Compare <bbox> and <bbox>.", "0 0 10 10", "the question has 2 <bbox> token(s) but 1 box(es) were given"),
    ("What is <bbox>?", "10 10 500 100", "outside the 320x240 image"),
    ("What is <bbox>?", "20 30 120 140\n1 2 3", "regions, line 2: expected four numbers x1 y1 x2 y2, got '1 2 3'"),
    ("x" * 4001, "", "the question is longer than 4000 characters"),
    ("What is <bbox>?", "1 2 3 4\n" * 9000, "the regions field is longer than 65536 characters"),
    (None, None, "question is empty"),
    ("<image> hi", "", "question contains '<image>'"),
    ("   ", "", "question is empty"),
])
def test_bad_questions_are_refused_and_the_dialogue_goes_on(client, image_path, fresh_replies, question, regions,
                                                            message):
    upload(client, image_path)
    ask(client, *ROUNDS[0])
    dialogue, picture, data, status, regions_after, question_after = ask(client, question, regions)
    assert message in data["error"] and status == f"Refused: {data['error']}"
    # Only the message changed: the page keeps the dialogue, the question and the regions as they were.
    assert all(value == {"__type__": "update"} for value in (dialogue, picture, regions_after, question_after))
    second = ask(client, *ROUNDS[1])[2]
    assert second["round"] == 2
    assert_same_reply(second, fresh_replies[1])


def test_bad_uploads_are_refused_and_the_dialogue_goes_on(demo, client, image_path, fresh_replies, tmp_path):
    upload(client, image_path)
    ask(client, *ROUNDS[0])
    files = {
        "notes.png": (b"%PDF-1.4 not a picture at all", "the uploaded file is not an image that can be read"),
        "bomb.png": (png_header_only(4000, 3000),
                     "the uploaded file is 4000x3000 = 12,000,000 pixels, more than the limit of 1,000,000 pixels"),
        "empty.png": (b"", "the uploaded file: the upload is empty"),
        # Few pixels, but the CLIP centre crop would scale it to 4,480,000x224.
        "thin.png": (png_bytes(sample_image(20000, 1)), "20000x1 image is too thin for the CLIP centre crop"),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_bytes(content)
        data, status = upload(client, tmp_path / name)[2:4]
        assert message in data["error"] and status == f"Refused: {data['error']}", name
    assert client.predict(None, api_name="/upload")[2] == {"error": "no file was uploaded"}
    # Gradio's own checks: the file type (by its name) and, before anything is stored, the size.
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(AppError, match=r"Invalid file type"):
        upload(client, tmp_path / "notes.pdf")
    (tmp_path / "huge.png").write_bytes(os.urandom(UPLOAD_LIMIT + 1))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {UPLOAD_LIMIT} bytes"):
        upload(client, tmp_path / "huge.png")  # gradio_client refuses it itself; the server too:
    answer = httpx.post(f"{demo.url}/gradio_api/upload", files={"files": ("huge.png", os.urandom(UPLOAD_LIMIT + 1))})
    assert answer.status_code == 413 and f"maximum allowed size of {UPLOAD_LIMIT} bytes" in answer.text
    second = ask(client, *ROUNDS[1])[2]
    assert second["round"] == 2
    assert_same_reply(second, fresh_replies[1])


def test_the_upload_handler_checks_the_size_itself(demo, tmp_path):
    """Files that Gradio fetched for a request (a URL instead of an upload) did not pass its upload limit."""
    (tmp_path / "huge.png").write_bytes(os.urandom(UPLOAD_LIMIT + 1))
    with pytest.warns(UserWarning, match=f"more than the limit of {UPLOAD_LIMIT:,} bytes"):
        data = demo.app.upload(str(tmp_path / "huge.png"))[3]
    assert data == {"error": f"the uploaded file is {UPLOAD_LIMIT + 1:,} bytes, more than the limit of "
                             f"{UPLOAD_LIMIT:,} bytes"}


def test_sessions_are_separate_and_bounded(connect, image_path):
    first = connect()
    assert "no image in this session: upload one first" in ask(first, "Hello?")[2]["error"]
    upload(first, image_path)
    assert ask(first, "Hello?")[2]["round"] == 1
    others = [connect() for _ in range(MAX_SESSIONS)]
    for other in others:  # each a dialogue of its own, round 1
        upload(other, image_path)
        assert ask(other, "Hello?")[2]["round"] == 1
    # Only MAX_SESSIONS dialogues are kept: the least recently used went.
    assert "no image in this session" in ask(first, "Hello?")[2]["error"]
    assert ask(others[-1], "Hello?")[2]["round"] == 2


def test_a_stalled_connection_holds_up_nobody(demo, client, image_path):
    """Clients that stop sending (mid-headers, mid-upload) do not keep the server from answering others."""
    host, port = demo.url.removeprefix("http://").split(":")
    stalled = []
    for sent in (b"POST /gradio_api/upload HTT",
                 b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; "
                 b"filename=\"a.png\"\r\n\r\nab"):
        conn = socket.create_connection((host, int(port)))
        conn.sendall(sent)
        stalled.append(conn)
    try:
        start = time.perf_counter()
        upload(client, image_path)
        assert ask(client, "Hello?")[2]["round"] == 1
        assert time.perf_counter() - start < 20
    finally:
        for conn in stalled:
            conn.close()


def test_the_picture_is_shrunk_and_boxes_drawn_to_scale(client, tmp_path):
    Image.new("RGB", (1600, 600), (230, 230, 230)).save(tmp_path / "wide.png")
    picture = upload(client, tmp_path / "wide.png")[1]
    assert Image.open(picture).size == (1024, 384)
    dialogue, picture, data = ask(client, "What is <bbox>?", "200 100 1000 500", ground=True)[:3]
    assert "region 1: [200, 100, 1000, 500]" in dialogue[0]["content"][0]["text"]  # pixels of the image
    drawn = Image.open(picture).convert("RGB")
    assert outlined(drawn, [128, 64, 640, 320], REGION_COLOUR)
    assert all(outlined(drawn, [v * 0.64 for v in box["box"]], PALETTE[k]) for k, box in enumerate(data["boxes"]))
