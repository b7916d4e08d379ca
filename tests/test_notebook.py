"""examples/chat_with_chatterbox.ipynb: committed without outputs, and runs headless against a tiny export,
drawing the boxes and printing the replies."""
from __future__ import annotations

import base64
import io
import os

import nbformat
from chat_support import build_tiny_chat_model, sample_image
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

from chatterbox.config import REPO_ROOT
from chatterbox.serve.draw import PALETTE, REGION_COLOUR

NOTEBOOK = REPO_ROOT / "examples" / "chat_with_chatterbox.ipynb"
RED_RECTANGLE = [20, 30, 120, 140]  # drawn by chat_support.sample_image


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, \
            f"cell {cell.id!r} was committed with its outputs: clear them before committing"


def with_parameters(notebook, **values) -> None:
    """Papermill's convention: a cell assigning ``values`` right after the cell tagged "parameters"."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))


def cells_tagged(notebook, tag: str) -> list:
    cells = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return cells


def printed(cell) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def shown_images(cell) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(out.data["image/png"]))).convert("RGB")
            for out in cell.outputs if out.output_type == "display_data" and "image/png" in out.data]


def has_colour(image: Image.Image, colour) -> bool:
    return any(found == colour for _, found in image.getcolors(image.width * image.height))


def test_the_notebook_runs_against_a_tiny_export(tiny_tokenizer, tmp_path, monkeypatch):
    export = build_tiny_chat_model(tiny_tokenizer).save_pretrained(tmp_path / "export")
    image = tmp_path / "shapes.png"
    sample_image().save(image)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with_parameters(notebook, EXPORT=str(export), IMAGE=str(image), GROUNDING_QUESTION="Where is the blue circle?",
                    REGION_BOX=RED_RECTANGLE, DEVICE="cpu", MAX_NEW_TOKENS=12)

    # The kernel imports this checkout's chatterbox and reads no IPython profile of the user's.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))  # the connection file
    # No kernel folders: "python3" is then ipykernel's own spec, run by this interpreter, not a "python3"
    # kernel some other environment installed for the user.
    kernel = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    try:
        # Started in examples/, as Jupyter starts it: the notebook must find the repository root itself.
        NotebookClient(notebook, km=kernel, timeout=120, startup_timeout=60,
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a failing cell
    finally:
        if kernel.has_kernel:  # nbclient leaves a kernel it was handed running
            kernel.shutdown_kernel(now=True)

    [grounding] = cells_tagged(notebook, "grounding")
    assert "ChatterBox:" in printed(grounding) and "box 1: [" in printed(grounding), printed(grounding)
    [drawn] = shown_images(grounding)
    assert drawn.size == (320, 240) and has_colour(drawn, PALETTE[0])  # the first box's colour

    [region] = cells_tagged(notebook, "region")
    reply_lines = [line for line in printed(region).splitlines() if line.startswith("ChatterBox:")]
    assert len(reply_lines) == 1 and reply_lines[0].removeprefix("ChatterBox:").strip(), printed(region)
    [drawn] = shown_images(region)
    assert has_colour(drawn, REGION_COLOUR)

    follow_ups = cells_tagged(notebook, "follow-up")
    assert len(follow_ups) >= 2
    for cell in follow_ups:
        assert "box 1: [" in printed(cell) and len(shown_images(cell)) == 1, printed(cell)

    dialogue = printed(notebook.cells[-1])
    rounds = [line for line in dialogue.splitlines() if line[:1].isdigit()]
    assert rounds == ["1. you: Where is the blue circle? [VG]", "2. you: What is it <bbox>?",
                      "3. you: Where is it? [VG]", "4. you: What is below it? [VG]"], dialogue
