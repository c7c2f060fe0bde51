"""``perceptio demo``: a Gradio page that shows what the model sees for one image and prompt.

For each request it shows the answer, each segmentation-token mask on the image, the decoded depth span as a
colour map (with the marker letters of marker questions drawn on it), the generated sequence with its spatial
tokens made readable, the span's code grid, and the time spent generating and decoding. Requests are queued and
answered one at a time (one model). Examples are rendered from the synthetic world at start (into a temporary
folder), plus a few HardBLINK photos when a HardBLINK folder is given.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from perceptio.data.errors import DataError
from perceptio.data.schema import Point, load_rgb
from perceptio.demo.render import depth_view, mask_view, readable_sequence, span_grid_html
from perceptio.vocab import SPATIAL_TOKEN_PATTERN

__all__ = ["DemoExample", "DemoModel", "build_demo", "world_examples"]

#: Longer sides are resized to this before the model sees them (the model works at a few hundred pixels).
MAX_SIDE = 1024
_CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>", "<img>", "</img>")


@dataclass(frozen=True)
class DemoExample:
    """An example of the page: an image file, its prompt, and the marker points drawn on the depth view."""

    image: Path
    prompt: str
    points: tuple[Point, ...] = ()


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def world_examples(folder: Path, *, seed: int = 7, hardblink: Path | None = None) -> list[DemoExample]:
    """Render a small synthetic world into ``folder`` and pick examples from it: referring expressions, marker
    questions (with their points), a depth request and a colour question; then up to three HardBLINK questions
    from ``hardblink`` (the benchmark's folder) when given."""
    from perceptio.data.readers import read_conversations, read_hardblink, read_refer
    from perceptio.data.synthetic import generate_world
    from perceptio.data.templates import render_sample
    from perceptio.vocab import PerceptionVocab

    world = folder / "world"
    if not (world / "manifest.json").is_file():
        generate_world(world, num_images=10, seed=seed, progress=False)
    rng = np.random.default_rng(seed)
    vocab = PerceptionVocab()
    examples: list[DemoExample] = []
    referring = {}  # the first expression of each of two images
    for sample in read_refer(world, "refcoco", split="train", image_root=world / "images"):
        referring.setdefault(sample.image.path, sample)
        if len(referring) == 2:
            break
    for sample in referring.values():
        examples.append(
            DemoExample(Path(sample.image.path), render_sample(sample, vocab, rng, spatial_cot=False).query)
        )
    marker_questions = read_hardblink(world / "hardblink" / "train", split="train")[:2]
    if hardblink is not None and Path(hardblink).is_dir():
        marker_questions += read_hardblink(hardblink)[:3]
    examples.append(DemoExample(examples[0].image, "What is the depth map for the image?"))
    for sample in read_conversations(world / "vqa" / "train.json", image_root=world / "images")[:1]:
        examples.append(DemoExample(Path(sample.image.path), sample.query.replace("<image>", "").strip()))
    for sample in marker_questions:
        query = render_sample(sample, vocab, rng, spatial_cot=False).query
        examples.append(DemoExample(Path(sample.image.path), query, sample.points))
    return examples


@dataclass
class DemoModel:
    """The model behind the page and what one request returns (kept apart from Gradio, so that it is testable)."""

    model: Any  # perceptio.inference.Perceptio
    examples: list[DemoExample] = field(default_factory=list)
    max_side: int = MAX_SIDE

    def __post_init__(self) -> None:
        self._points = {_digest(e.image): e.points for e in self.examples if e.points}

    def preview(self, image_path: str | None) -> Any:  # noqa: ANN401 - a PIL image or None
        """The uploaded image as the model will see it (None when there is none or it is not an image)."""
        if not image_path:
            return None
        try:
            return load_rgb(image_path)
        except DataError:
            return None

    def answer(self, image_path: str | None, prompt: str | None, spatial_cot: bool, constrain: bool) -> dict[str, Any]:
        """One request: the page's outputs by name (``status`` holds a message for the user, empty when none)."""
        empty: dict[str, Any] = {
            "answer": "", "overlay": None, "depth": None, "sequence": "", "grid": "", "latency": "", "status": "",
        }  # fmt: skip
        if not image_path:
            return {**empty, "status": "Upload an image or pick an example."}
        if not (prompt or "").strip():
            return {**empty, "status": "Type a prompt (a question, or e.g. 'Please segment the red cube.')."}
        try:
            with Image.open(image_path) as header:  # the size only: nothing is decoded yet
                original = header.size
        except (OSError, ValueError, Image.DecompressionBombError):
            original = None
        try:  # large images shrink while decoding (cheap for JPEG)
            image = load_rgb(image_path, name=Path(image_path).name, max_side=self.max_side)
        except DataError as err:
            return {**empty, "status": f"This file cannot be used: {err.problem}. {err.fix or ''}".strip()}
        notes = []
        points = self._points.get(_digest(image_path), ()) if self._points else ()  # only examples have points
        if original is not None and image.size != original:
            scale = image.size[0] / original[0]
            points = tuple(Point(p.label, p.x * scale, p.y * scale) for p in points)
            notes.append(f"The image ({original[0]}x{original[1]}) was resized to {image.size[0]}x{image.size[1]}.")
        if SPATIAL_TOKEN_PATTERN.search(prompt) or any(marker in prompt for marker in _CHAT_MARKERS):
            notes.append("Control tokens typed in the prompt are read as plain text, not as tokens.")
        began = time.perf_counter()
        prediction = self.model.predict(image, prompt, spatial_cot=spatial_cot, constrain=constrain)
        total = time.perf_counter() - began
        vocab = self.model.model.config.vocab
        seconds = prediction.seconds
        latency = (
            f"generation {1000 * seconds.get('generation', 0):.0f} ms, masks and depth "
            f"{1000 * seconds.get('decoding', 0):.0f} ms, request {1000 * total:.0f} ms"
        )
        if prediction.issues:
            notes.append("Malformed output: " + "; ".join(prediction.issues) + ".")
        return {
            "answer": prediction.answer or "(no text answer)",
            "overlay": mask_view(image, prediction.masks),
            "depth": depth_view(prediction.depth, points) if prediction.depth is not None else None,
            "sequence": readable_sequence(prediction.text, vocab),
            "grid": span_grid_html(prediction.depth_codes),
            "latency": latency,
            "status": " ".join(notes),
        }


def build_demo(demo_model: DemoModel):  # noqa: ANN201 - gradio.Blocks (gradio is an optional dependency)
    """The Gradio page around ``demo_model``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    outputs_order = ("answer", "overlay", "depth", "sequence", "grid", "latency", "status")

    def respond(image_path: str | None, prompt: str, spatial: bool, constrain: bool) -> tuple:
        result = demo_model.answer(image_path, prompt, spatial, constrain)
        return tuple(result[name] for name in outputs_order)

    with gr.Blocks(title="Perceptio") as page:
        gr.Markdown(
            "# Perceptio\nThe model writes spatial tokens before it answers: a segmentation token whose mask is "
            "drawn on the image, then a depth span decoded into a depth map, then the answer."
        )
        with gr.Row():
            with gr.Column():
                # a file input, not gr.Image: the page's own checks (and messages) see every upload, even one that
                # is not an image, which gr.Image would reject with an error of its own
                image = gr.File(label="image", file_types=["image"], type="filepath", elem_id="input-image")
                preview = gr.Image(label="input", interactive=False, elem_id="input-preview", height=220)
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                with gr.Row():
                    config = demo_model.model.model.config  # the model's own settings are the page's defaults
                    spatial = gr.Checkbox(value=config.spatial_cot, label="spatial chain of thought", elem_id="spatial")
                    constrain = gr.Checkbox(value=config.constrain, label="constrained decoding", elem_id="constrain")
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
                latency = gr.Textbox(label="latency", interactive=False, elem_id="latency")
                with gr.Row():
                    overlay = gr.Image(label="segmentation masks", interactive=False, elem_id="overlay")
                    depth = gr.Image(label="decoded depth (bright = near)", interactive=False, elem_id="depth")
                sequence = gr.Textbox(label="generated sequence", interactive=False, elem_id="sequence")
                grid = gr.HTML(elem_id="grid")
        if demo_model.examples:
            gr.Examples([[str(e.image), e.prompt] for e in demo_model.examples], inputs=[image, prompt])
        image.change(demo_model.preview, inputs=[image], outputs=[preview])
        submit.click(
            respond,
            inputs=[image, prompt, spatial, constrain],
            outputs=[answer, overlay, depth, sequence, grid, latency, status],
        )
    page.queue(default_concurrency_limit=1)  # one model: requests wait their turn, every tab gets its answer
    return page


def launch(
    model_dir: Path | None, *, host: str = "127.0.0.1", port: int | None = None, hardblink: Path | None = None
) -> None:
    """Load the model, render the examples into a temporary folder, and serve the page until interrupted."""
    from perceptio.inference import Perceptio

    model = Perceptio.from_pretrained(model_dir if model_dir is not None else "tiny-perceptio")
    with tempfile.TemporaryDirectory(prefix="perceptio-demo-") as folder:
        examples = world_examples(Path(folder), hardblink=hardblink)
        page = build_demo(DemoModel(model, examples))
        page.launch(server_name=host, server_port=port, share=False, show_error=True)
