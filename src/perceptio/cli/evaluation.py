"""`perceptio predict` and `perceptio eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    end_distributed,
    fail,
    flat_metrics,
    format_metric,
    model_or_shipped,
    print_table,
)

# Decoding options shared by `predict` and `eval`.
SpatialCot = Annotated[
    bool | None,
    typer.Option(
        "--spatial-cot/--no-spatial-cot",
        help="Let the model write a depth span before its answer, or ban it (default: the model's setting).",
        show_default=False,
    ),
]
SpanWindow = Annotated[
    int, typer.Option(min=1, help="Depth-span tokens decoded per forward (exact; 1: one at a time).")
]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the decoding step (long runs).")]


def predict(
    out: Annotated[Path, typer.Option(help="Output folder: one sub-folder of files per (image, prompt).")],
    model: Annotated[
        Path | None,
        typer.Option(help="A model folder (perceptio train's model/); default: the shipped tiny Perceptio model."),
    ] = None,
    image: Annotated[list[Path] | None, typer.Option(help="An image (repeat for several).")] = None,
    prompt: Annotated[str | None, typer.Option(help="The prompt, asked about every --image.")] = None,
    jsonl: Annotated[
        Path | None, typer.Option(help='A JSONL file of {"image": PATH, "prompt": TEXT} lines (paths relative to it).')
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    spatial_cot: SpatialCot = None,
    span_window: SpanWindow = 16,
    compile: Compile = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
) -> None:
    """Answer prompts about images; write the answer, raw sequence, masks, overlay and depth map for each.

    Give either --image (one or more) with --prompt, or --jsonl with one image and prompt per line."""
    from tqdm.auto import tqdm

    from perceptio.data.errors import DataError
    from perceptio.inference import Perceptio, prediction_folder_names, read_prompts_jsonl

    pairs: list[tuple[Path, str]] = []
    if jsonl is not None:
        try:
            pairs += read_prompts_jsonl(jsonl)
        except DataError as err:
            fail(str(err))
    if image:
        if prompt is None:
            fail("--image needs --prompt")
        pairs += [(path, prompt) for path in image]
    if not pairs:
        fail("nothing to predict: give --image PATH --prompt TEXT, or --jsonl FILE")
    for path, _ in pairs:
        if not path.is_file():
            fail(f"image not found: {path}")
    try:
        runner = Perceptio.from_pretrained(model_or_shipped(model), device=device)
    except (FileNotFoundError, ValueError, OSError) as err:
        fail(str(err))
    folders = prediction_folder_names([path for path, _ in pairs])  # unique per (image, prompt), stable
    bar = tqdm(total=len(pairs), desc="predict", disable=len(pairs) < 2)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        try:
            predictions = runner.predict(
                [p for p, _ in chunk],
                [q for _, q in chunk],
                spatial_cot=spatial_cot,
                batch_size=batch_size,
                span_window=span_window,
                compile=compile,
            )
        except DataError as err:  # the image is named; predictions of earlier batches are already written
            fail(str(err))
        for k, ((path, question), prediction) in enumerate(zip(chunk, predictions, strict=True)):
            folder = out / folders[start + k]
            runner.save_prediction(prediction, path, folder, prompt=question)
            depth = "yes" if prediction.depth is not None else "no"
            issues = f" issues: {'; '.join(prediction.issues)}" if prediction.issues else ""
            tqdm.write(
                f"{path.name}: {prediction.answer!r} ({len(prediction.masks)} mask(s), depth {depth}) -> {folder}"
                f"{issues}"
            )
        bar.update(len(chunk))
    bar.close()


def evaluate(
    task: Annotated[str, typer.Argument(help="refcoco, hardblink, blink, mmbench, depth or vqa.")],
    data: Annotated[Path, typer.Option(help="The benchmark data (see docs/evaluation.md for each task).")],
    out: Annotated[Path, typer.Option(help="Output folder: predictions.jsonl, metrics.json.")],
    model: Annotated[
        Path | None,
        typer.Option(help="A model folder (perceptio train's model/); default: the shipped tiny Perceptio model."),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split (refcoco: val/testA/testB/test; blink: val).")] = None,
    dataset: Annotated[str, typer.Option(help="refcoco, refcoco+ or refcocog (task refcoco).")] = "refcoco",
    image_root: Annotated[Path | None, typer.Option(help="Images, when not found next to the annotations.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Skip samples already predicted.")] = False,
    spatial_cot: SpatialCot = None,
    constrain: Annotated[
        bool | None,
        typer.Option(
            "--constrain/--no-constrain",
            help="Constrain the depth-span grammar while decoding (default: the model's setting, on).",
            show_default=False,
        ),
    ] = None,
    span_window: SpanWindow = 16,
    compile: Compile = False,
    first_mask: Annotated[
        bool,
        typer.Option(
            "--first-mask/--all-masks",
            help="refcoco: score each answer's first segmentation-token mask alone and stop the answer there "
            "(several times faster; the same mask), or write whole answers and OR all their masks.",
        ),
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
) -> None:
    """Evaluate a model on a benchmark: predictions.jsonl (resumable), metrics.json and a summary table. Under
    torchrun each process takes a shard."""
    from perceptio.data.errors import DataError
    from perceptio.eval.harness import EvalSettings, IncompleteEvaluationError, run_eval
    from perceptio.utils.distributed import launched_by_torchrun
    from perceptio.utils.runlock import RunFolderLockedError

    distributed = launched_by_torchrun()
    try:
        settings = EvalSettings(
            task=task,
            model=model_or_shipped(model),
            data=data,
            out=out,
            split=split,
            dataset=dataset,
            image_root=image_root,
            limit=limit,
            batch_size=batch_size,
            resume=resume,
            spatial_cot=spatial_cot,
            constrain=constrain,
            span_window=span_window,
            compile=compile,
            first_mask=first_mask,
            device=device,
        )
        metrics = run_eval(settings)
    except (DataError, FileNotFoundError, ValueError, IncompleteEvaluationError, RunFolderLockedError) as err:
        fail(str(err).strip('"'))
    if metrics:
        print_table([("metric", "value")] + [(k, format_metric(v)) for k, v in flat_metrics(metrics).items()])
        typer.echo(f"predictions and metrics in {out}")
    if distributed:
        end_distributed()
