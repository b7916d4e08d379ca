"""The terminal chat, driven through a pseudo-terminal like a user would."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from chat_support import sample_image
from PIL import Image

from chatterbox.config import REPO_ROOT
from chatterbox.serve.cli import parse_box


class Terminal:
    """A process on a pseudo-terminal: type lines, wait for text."""

    def __init__(self, argv: list[str], env: dict):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO_ROOT,
                                        close_fds=True)
        os.close(slave)
        self.output = ""

    def expect(self, text: str, timeout: float = 120.0) -> str:
        """Everything printed up to and including ``text`` (consumed from the buffer)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and not self._pending():
                raise AssertionError(f"did not see {text!r}; the terminal shows:\n{self.output}")
            if select.select([self.master], [], [], min(remaining, 1.0))[0]:
                try:
                    self.output += os.read(self.master, 65536).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the process closed the terminal
                    pass
        end = self.output.index(text) + len(text)
        seen, self.output = self.output[:end], self.output[end:]
        return seen

    def _pending(self) -> bool:
        return bool(select.select([self.master], [], [], 0)[0])

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.process.wait(timeout=30)
        finally:
            os.close(self.master)


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "scene.png"
    sample_image(320, 240).save(path)
    return path


def cli_argv(image_path, *extra) -> list[str]:
    return [sys.executable, "-m", "chatterbox.serve.cli", "--config", "tiny_stage1",
            "--image", str(image_path), "--max-new-tokens", "6", *extra]


def cli_env(tmp_path) -> dict:
    return {**os.environ, "CHATTERBOX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def test_parse_box():
    assert parse_box("10 20 110 220") == [10.0, 20.0, 110.0, 220.0]
    assert parse_box("[10, 20.5, 1e2, 220]") == [10.0, 20.5, 100.0, 220.0]
    for bad in ("10 20 30", "a b c d", "1 2 3 4 5", ""):
        with pytest.raises(ValueError, match="four numbers"):
            parse_box(bad)


def test_interactive_rounds_with_regions_boxes_and_errors(tmp_path, image_path):
    saved = tmp_path / "boxes.png"
    term = Terminal(cli_argv(image_path, "--save-image", str(saved)), cli_env(tmp_path))
    try:
        assert "looking at" in term.expect("/help for help.")
        term.expect("you> ")
        # Round 1: a region, typed with a mistake first.
        term.send("What is <bbox>? [VG]")
        term.expect("box 1/1 for <bbox> (x1 y1 x2 y2, pixels of the 320x240 image)> ")
        term.send("10 20 oops")
        assert "error: expected four numbers" in term.expect("box 1/1 for <bbox>")
        term.send("20, 30, 120, 140")
        reply = term.expect("you> ")
        assert "ChatterBox> " in reply
        assert "box 1 ([VG] in the question): [" in reply and "score" in reply
        assert f"image with boxes saved to {saved}" in reply
        drawn = Image.open(saved)
        assert drawn.size == (320, 240)
        # The region outline (yellow) was drawn over the image's grey background at its left edge.
        assert drawn.getpixel((20, 90))[:3] != sample_image(320, 240).getpixel((20, 90))
        # Round 2: wrong input is refused with a message, the session goes on.
        term.send("Is <bbox> bigger?")
        term.expect("box 1/1 for <bbox>")
        term.send("10 10 900 100")
        assert "error: boxes[0]=[10.0, 10.0, 900.0, 100.0]: outside the 320x240 image" in term.expect("you> ")
        term.send("And the other one? [VG]")
        assert "ChatterBox> " in term.expect("you> ")
        term.send("/reset")
        assert "(dialogue cleared)" in term.expect("you> ")
        term.send("/quit")
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()


def test_missing_image_is_reported_before_loading(tmp_path):
    result = subprocess.run(cli_argv(tmp_path / "nope.jpg"), env=cli_env(tmp_path), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "file not found" in result.stderr and "nope.jpg" in result.stderr
