"""The `perceptio` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from perceptio import __version__
from perceptio.errors import UserError
from perceptio.experiments.grounding import ARMS as LADDER_ARMS
from perceptio.experiments.grounding import LEVELS

# OpenMP's default wait policy keeps idle threads spinning; beside another busy process on a small machine that
# makes tokenizer training and evaluation 3x slower (bench/under_load.py), where passive waiting slows them in
# proportion to the cores taken. It must be set before torch loads its OpenMP runtime, which none of the imports
# above does; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="perceptio", help="Perceptio: spatial tokens before the answer.", no_args_is_help=True, add_completion=False
)
data_app = typer.Typer(help="Make, check and look at datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
tokenizer_app = typer.Typer(help="Train and evaluate the depth tokenizer (VQ-VAE).", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

_FORMATS = ("refcoco", "hardblink", "blink", "mmbench", "conversation", "depth")
# The options of `perceptio data check` that each format takes.
_CHECK_OPTIONS: dict[str, set[str]] = {
    "refcoco": {"split", "dataset", "image_root"},
    "hardblink": {"split"},
    "blink": {"split"},
    "mmbench": set(),
    "conversation": {"split", "image_root"},
    "depth": {"split", "image_root"},
}


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _model_or_shipped(model: Path | None) -> Path:
    """``--model``, or the tiny Perceptio model that ships with the package."""
    if model is not None:
        return model
    from perceptio.weights import shipped

    try:
        folder = shipped("tiny-perceptio")
    except FileNotFoundError as err:
        _fail(f"no --model given, and {err}")
    typer.echo(f"using the shipped tiny Perceptio model {folder}", err=True)
    return folder


def _end_distributed() -> None:
    """Leave a torchrun process through barrier, destroy, flush and ``os._exit(0)``: gloo can otherwise abort at
    interpreter exit (SIGABRT) and fail the torchrun job."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        typer.echo(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            typer.echo("  ".join("-" * w for w in widths))


def print_world_summary(summary) -> None:  # noqa: ANN001 - WorldSummary, imported lazily
    """Print per-split counts of a generated world as a table."""
    splits = ("train", "val", "test")
    rows: list[tuple[str, ...]] = [("", *splits, "total")]

    def row(label: str, values: list[int]) -> None:
        rows.append((label, *map(str, values), str(sum(values))))

    row("images", [summary.images[s] for s in splits])
    row("objects", [summary.objects[s] for s in splits])
    ref = summary.referring_expressions
    row("referring expressions", [ref["train"], ref["val"], ref["testA"] + ref["testB"]])
    counts = sorted(
        {int(k.split("/")[1][:-2]) for k in summary.relative_depth}
        | {int(k.split("/")[1][:-2]) for k in summary.relative_depth_skipped}
    )
    for n in counts:
        row(f"relative depth, {n} points", [summary.relative_depth[f"{s}/{n}pt"] for s in splits])
    row("VQA questions", [summary.vqa[s] for s in splits])
    row("multiple-choice rows (circular)", [summary.mcq_rows[s] for s in splits])
    _print_table(rows)
    skipped = sum(summary.relative_depth_skipped.values())
    if skipped:
        typer.echo(
            f"{skipped} image(s) had no mid-height points with clear depth gaps for their marker question: "
            f"{dict(summary.relative_depth_skipped)}"
        )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def version() -> None:
    """Print the Perceptio version."""
    typer.echo(__version__)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    num_images: Annotated[int, typer.Option(min=1, help="Number of images (scenes).")] = 1000,
    seed: Annotated[int, typer.Option(help="World seed; same seed and options give identical files.")] = 0,
    size: Annotated[
        int, typer.Option(min=32, help="Image side in pixels (128 default; 64 for the tiny preset).")
    ] = 128,
    noise: Annotated[
        bool, typer.Option("--noise/--no-noise", help="Add faint sensor noise to the RGB images.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace an existing output folder.")
    ] = False,
) -> None:
    """Render the synthetic spatial world and write it in the real formats (RefCOCO, HardBLINK, MMBench, ...)."""
    from perceptio.data.synthetic import WorldConfig, generate_world

    try:
        summary = generate_world(
            out, num_images=num_images, seed=seed, config=WorldConfig(image_size=size, noise=noise), overwrite=overwrite
        )
    except (FileExistsError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out} in {summary.seconds:.1f} s")
    print_world_summary(summary)


@data_app.command("show")
def data_show(
    world: Annotated[Path, typer.Argument(help="A folder written by `perceptio data synth`.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the PNG contact sheet (default: WORLD/grid.png).")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Number of scenes to show.")] = 16,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "val",
) -> None:
    """Draw a contact sheet: image with masks, depth, markers, and each scene's questions and answers."""
    from perceptio.data.errors import DataError
    from perceptio.data.synthetic.show import contact_sheet

    try:
        sheet = contact_sheet(world, n=n, split=split)
    except DataError as err:
        _fail(str(err))
    out = out if out is not None else world / "grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    typer.echo(f"wrote {out} ({sheet.width}x{sheet.height})")


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="The dataset: a folder or file in the given format.")],
    format: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(_FORMATS)}.")],
    split: Annotated[str | None, typer.Option(help="Split to check (refcoco: train/val/testA/testB/test).")] = None,
    dataset: Annotated[str, typer.Option(help="refcoco only: refcoco, refcoco+ or refcocog.")] = "refcoco",
    image_root: Annotated[Path | None, typer.Option(help="Image folder (refcoco, conversation, depth).")] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad/--no-skip-bad", help="Record bad items in a report and go on.")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Where to write the skipped-items report (JSON).")] = None,
) -> None:
    """Read a dataset and decode every image, mask and depth map, reporting anything broken."""
    from perceptio.data.errors import BadItemReport, DataError
    from perceptio.data.readers import READERS, check_samples

    if format not in READERS:
        _fail(f"unknown --format {format!r}; use one of {sorted(READERS)}")
    given = {"split": split, "dataset": dataset if dataset != "refcoco" else None, "image_root": image_root}
    unused = sorted(k for k, v in given.items() if v is not None and k not in _CHECK_OPTIONS[format])
    if unused:
        names = ", ".join("--" + k.replace("_", "-") for k in unused)
        _fail(f"--format {format} does not take {names}; it takes {sorted(_CHECK_OPTIONS[format]) or 'no options'}")
    kwargs: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    if format == "refcoco":
        kwargs.setdefault("split", "val")
        kwargs.setdefault("dataset", "refcoco")
    if format == "depth" and "image_root" in kwargs:
        kwargs["image_dir"] = kwargs.pop("image_root")
    bad = BadItemReport()
    try:
        samples = READERS[format](path, **kwargs, skip_bad=skip_bad, report=bad)
        passed = check_samples(samples, skip_bad=skip_bad, report=bad)
    except DataError as err:
        _fail(f"{err}\n(re-run with --skip-bad to list every bad item)")
    typer.echo(f"{passed} of {len(samples)} samples decoded cleanly; {len(bad)} bad item(s) skipped")
    if len(bad):
        for item in bad.items[:20]:
            typer.echo(f"  {item.location}: {item.problem}")
        if len(bad) > 20:
            typer.echo(f"  ... and {len(bad) - 20} more")
    if report is not None:
        bad.write(report)
        typer.echo(f"report written to {report}")
    if passed == 0:  # --skip-bad keeps going, but a dataset with nothing usable is still a failure
        _fail(f"no sample of {path} decoded cleanly; nothing here can be trained or evaluated on")


_TEACHER_HELP = "ground-truth (alias exact: the depth stored with the data) or depth-anything:/path/to/checkpoint."


@tokenizer_app.command("train")
def tokenizer_train(
    data: Annotated[Path, typer.Option(help="A synthetic world, a depth folder (depth.json), or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Output folder: the tokenizer checkpoint, logs and checkpoints/.")],
    preset: Annotated[
        str, typer.Option(help="tiny (64 px, 8x8 codes, K=32) or aurora (320 px, 10x10, K=128).")
    ] = "tiny",
    teacher: Annotated[str, typer.Option(help=_TEACHER_HELP)] = "ground-truth",
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Maps per step.")] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 3e-4,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Steps between checkpoints (0: none).")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of batch sampling and codebook restarts.")] = 0,
    split: Annotated[str, typer.Option(help="Split of a synthetic world to train on.")] = "train",
    image_dir: Annotated[
        Path | None, typer.Option(help="Images of a depth folder, if not beside the depth maps.")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Teacher-map cache (default $PERCEPTIO_CACHE or ~/.cache/perceptio).")
    ] = None,
    device: Annotated[str, typer.Option(help="Device of the teacher network (cpu, cuda).")] = "cpu",
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the newest checkpoint in --out.")
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad/--no-skip-bad", help="Skip bad maps (listed in skipped.json).")
    ] = False,
) -> None:
    """Train the depth tokenizer on teacher depth maps, with checkpoints and --resume."""
    from perceptio.data.errors import DataError
    from perceptio.tokenizers.depth.pipeline import train_from_folder
    from perceptio.tokenizers.depth.train import TokenizerTrainConfig
    from perceptio.utils.runlock import RunFolderLockedError

    try:
        config = TokenizerTrainConfig(
            steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed
        )
        _, report = train_from_folder(
            data,
            out,
            preset=preset,
            train_config=config,
            teacher=teacher,
            split=split,
            image_dir=image_dir,
            cache_dir=cache_dir,
            device=device,
            resume=resume,
            skip_bad=skip_bad,
        )
    except (
        DataError,
        FileExistsError,
        FileNotFoundError,
        FloatingPointError,
        KeyError,
        RunFolderLockedError,
        ValueError,
    ) as err:
        _fail(str(err).strip('"'))
    summary = json.loads((out / "training.json").read_text())
    final = summary["final"]
    typer.echo(
        f"saved the tokenizer to {out}: {steps} steps, loss {final.get('loss', float('nan')):.4f}, "
        f"codebook usage {100 * final.get('codebook_usage', 0):.0f}% ({len(report)} map(s) skipped)"
    )


@tokenizer_app.command("eval")
def tokenizer_eval(
    ckpt: Annotated[Path, typer.Option(help="A tokenizer checkpoint folder (config.json + model.safetensors).")],
    data: Annotated[Path, typer.Option(help="A synthetic world, a depth folder, or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Where metrics.json and reconstructions.png go.")],
    split: Annotated[str, typer.Option(help="Split of a synthetic world to evaluate on.")] = "val",
    teacher: Annotated[str, typer.Option(help=_TEACHER_HELP)] = "ground-truth",
    image_dir: Annotated[
        Path | None, typer.Option(help="Images of a depth folder, if not beside the depth maps.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Teacher-map cache.")] = None,
    device: Annotated[str, typer.Option(help="Device (cpu, cuda).")] = "cpu",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N maps.")] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad/--no-skip-bad", help="Skip bad maps (listed in skipped.json).")
    ] = False,
) -> None:
    """Measure what the tokenizer keeps: AbsRel, RMSE, delta<1.25, closest-point accuracy, codebook usage."""
    from perceptio.data.errors import DataError
    from perceptio.tokenizers.depth.model import CheckpointMismatchError
    from perceptio.tokenizers.depth.pipeline import evaluate_folder

    try:
        results = evaluate_folder(
            ckpt,
            data,
            out,
            split=split,
            teacher=teacher,
            image_dir=image_dir,
            cache_dir=cache_dir,
            device=device,
            limit=limit,
            skip_bad=skip_bad,
        )
    except (DataError, FileNotFoundError, CheckpointMismatchError, ValueError) as err:
        _fail(str(err))
    print_tokenizer_metrics(results)
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'reconstructions.png'}")


def print_tokenizer_metrics(results: dict) -> None:
    """Print tokenizer-vs-baseline metrics as a table."""
    ours, base = results["tokenizer"], results.get("mean_map_baseline")
    unit = " (m)" if results["space"] == "metric_depth" else ""
    rows: list[tuple[str, ...]] = [("", "tokenizer", "mean-map baseline")]

    def fmt(value: object, pct: bool = False) -> str:
        if value is None:
            return "-"
        return f"{100 * float(value):.1f}%" if pct else f"{float(value):.4f}"

    rows.append(("AbsRel", fmt(ours["abs_rel"]), fmt(base["abs_rel"]) if base else "-"))
    rows.append((f"RMSE{unit}", fmt(ours["rmse"]), fmt(base["rmse"]) if base else "-"))
    rows.append(("delta<1.25", fmt(ours["delta1"], True), fmt(base["delta1"], True) if base else "-"))
    rows.append(("RMSE (normalised)", fmt(ours["rmse_normalized"]), fmt(base["rmse_normalized"]) if base else "-"))
    for n, acc in ours["closest_point_accuracy"].items():
        sets = ours["closest_point_sets"][n]
        rows.append(
            (
                f"closest of {n} points ({sets} sets)",
                fmt(acc, True),
                fmt(base["closest_point_accuracy"][n], True) if base else "-",
            )
        )
    book = results["codebook"]
    rows.append(("codebook usage", fmt(book["usage"], True), ""))
    rows.append(("codebook perplexity", f"{book['perplexity']:.1f} of {book['num_codes']}", ""))
    typer.echo(
        f"{results['num_maps']} maps of {results['data']} ({results['split']}), "
        f"metrics in {results['space'].replace('_', ' ')}"
    )
    _print_table(rows)


segmenter_app = typer.Typer(help="Pretrain the SAM2 segmenter with point and box prompts.", no_args_is_help=True)
app.add_typer(segmenter_app, name="segmenter")


@segmenter_app.command("pretrain")
def segmenter_pretrain(
    data: Annotated[Path, typer.Option(help="A refer root (refs(unc).p + instances.json), e.g. a synthetic world.")],
    out: Annotated[Path, typer.Option(help="Output folder: the SAM2 checkpoint and pretraining.json.")],
    preset: Annotated[str, typer.Option(help="Model preset whose segmenter architecture is trained.")] = "tiny",
    image_root: Annotated[Path | None, typer.Option(help="Images (default: the refer layout's own).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(min=1, help="Objects per step.")] = 32,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate (cosine to 0).")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = 0,
) -> None:
    """Train a SAM2 on object masks with point/box prompts; report its point-prompted cIoU on the val split."""
    from perceptio.data.errors import DataError
    from perceptio.train.segmenter import SegmenterPretrainConfig, pretrain_on_refer

    try:
        config = SegmenterPretrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        reference = pretrain_on_refer(data, out, config, preset=preset, image_root=image_root)
    except (DataError, ValueError) as err:
        _fail(str(err))
    typer.echo(
        f"saved the segmenter to {out}; point-prompted val cIoU {reference['ciou']:.3f}, gIoU {reference['giou']:.3f} "
        f"({reference['objects']} expressions)"
    )


@app.command()
def train(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="A training recipe (YAML), e.g. configs/tiny_synth.yaml.")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the recipe, e.g. run.steps=50 optim.lr=5e-4.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the newest checkpoint in run.out_dir.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace an earlier run's outputs in run.out_dir.")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Teacher-map cache (default $PERCEPTIO_CACHE or ~/.cache/perceptio).")
    ] = None,
) -> None:
    """Train Perceptio from a recipe. Under torchrun (`torchrun --nproc_per_node=N -m perceptio train ...`) every
    process trains its share of each global batch (DDP, or FSDP with run.distributed=fsdp)."""
    from perceptio.config import ConfigError, load_config
    from perceptio.data.errors import DataError
    from perceptio.tokenizers.depth.pipeline import default_cache_dir
    from perceptio.train.config import TrainConfig
    from perceptio.train.loop import train as run_training
    from perceptio.utils.runlock import RunFolderLockedError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        recipe = load_config(TrainConfig, config, overrides or [])
        result = run_training(recipe, resume=resume, overwrite=overwrite, cache_dir=cache_dir or default_cache_dir())
    except (
        ConfigError,
        DataError,
        FileExistsError,
        FileNotFoundError,
        FloatingPointError,
        RunFolderLockedError,
        ValueError,
    ) as err:
        _fail(str(err).strip('"'))
    if result.model_dir is not None:
        final = result.last_log
        typer.echo(
            f"saved the model to {result.model_dir} after {result.steps} steps "
            f"(loss {final.get('loss', float('nan')):.4f}); logs in {result.out_dir}"
        )
    if distributed:
        _end_distributed()


@app.command()
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
    spatial_cot: Annotated[
        bool, typer.Option("--spatial-cot/--no-spatial-cot", help="Let the model write spatial tokens.")
    ] = True,
    span_window: Annotated[
        int, typer.Option(min=1, help="Depth-span tokens decoded per forward (exact; 1: one at a time).")
    ] = 16,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile the decoding step (long runs).")
    ] = False,
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
            _fail(str(err))
    if image:
        if prompt is None:
            _fail("--image needs --prompt")
        pairs += [(path, prompt) for path in image]
    if not pairs:
        _fail("nothing to predict: give --image PATH --prompt TEXT, or --jsonl FILE")
    for path, _ in pairs:
        if not path.is_file():
            _fail(f"image not found: {path}")
    try:
        runner = Perceptio.from_pretrained(_model_or_shipped(model), device=device)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err))
    folders = prediction_folder_names([path for path, _ in pairs])  # unique per (image, prompt), stable
    bar = tqdm(total=len(pairs), desc="predict", disable=len(pairs) < 2)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        try:
            predictions = runner.predict(
                [p for p, _ in chunk],
                [q for _, q in chunk],
                spatial=spatial_cot,
                batch_size=batch_size,
                span_window=span_window,
                compile=compile,
            )
        except DataError as err:  # the image is named; predictions of earlier batches are already written
            _fail(str(err))
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


@app.command("eval")
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
    spatial_cot: Annotated[
        bool, typer.Option("--spatial-cot/--no-spatial-cot", help="Off: ban spatial tokens (direct answering).")
    ] = True,
    constrain: Annotated[
        bool, typer.Option("--constrain/--no-constrain", help="Constrain the depth-span grammar while decoding.")
    ] = True,
    span_window: Annotated[
        int, typer.Option(min=1, help="Depth-span tokens decoded per forward (exact; 1: one at a time).")
    ] = 16,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile the decoding step (long runs).")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
) -> None:
    """Evaluate a model on a benchmark: predictions.jsonl (resumable), metrics.json and a summary table. Under
    torchrun each process takes a shard."""
    from perceptio.data.errors import DataError
    from perceptio.eval.harness import EvalSettings, IncompleteEvaluationError, run_eval
    from perceptio.utils.runlock import RunFolderLockedError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        settings = EvalSettings(
            task=task,
            model=_model_or_shipped(model),
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
            device=device,
        )
        metrics = run_eval(settings)
    except (DataError, FileNotFoundError, ValueError, IncompleteEvaluationError, RunFolderLockedError) as err:
        _fail(str(err).strip('"'))
    if metrics:
        _print_table([("metric", "value")] + [(k, _format_metric(v)) for k, v in _flat_metrics(metrics).items()])
        typer.echo(f"predictions and metrics in {out}")
    if distributed:
        _end_distributed()


def _flat_metrics(payload: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in payload.items():
        if isinstance(value, dict):
            flat.update(_flat_metrics(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def _format_metric(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command()
def quickstart(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the training recipe, e.g. run.steps=300.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/quickstart"),
    recipe: Annotated[Path, typer.Option(help="Training recipe.")] = Path("configs/tiny_synth.yaml"),
    num_images: Annotated[int, typer.Option(min=10, help="Images in the synthetic world.")] = 4000,
    world_seed: Annotated[int, typer.Option(help="Seed of the synthetic world.")] = 0,
    tokenizer_steps: Annotated[int, typer.Option(min=1, help="Depth-tokenizer training steps.")] = 1500,
    segmenter_steps: Annotated[int, typer.Option(min=1, help="SAM2 pretraining steps.")] = 1500,
    eval_limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N samples of each task.")
    ] = None,
    gallery: Annotated[int, typer.Option(min=0, help="Val images in the report's gallery.")] = 4,
    baseline_steps: Annotated[
        int, typer.Option(min=0, help="Steps of the FiLM CNN VQA baseline shown in the report (0: skip it).")
    ] = 1000,
    base: Annotated[
        Path | None, typer.Option(help="The pretrained base to fine-tune from (default: the shipped tiny base).")
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train Perceptio from random weights instead of the base.")
    ] = False,
    export: Annotated[
        Path | None,
        typer.Option(help="After the report, copy the model here with a model card and SHA256SUMS (a new folder)."),
    ] = None,
) -> None:
    """The main job, end to end: render the synthetic world, pretrain the tiny SAM2 and depth tokenizer, fine-tune
    Perceptio from the pretrained tiny base, evaluate it on the val split, predict a few images and write a report.

    Finished stages are reused: a second run only redoes what changed (and what follows it).
    """
    from perceptio.config import ConfigError
    from perceptio.data.errors import DataError
    from perceptio.eval.harness import IncompleteEvaluationError
    from perceptio.quickstart import QuickstartConfig, export_quickstart_model, run_quickstart
    from perceptio.utils.runlock import RunFolderLockedError

    if not recipe.is_file():
        _fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    try:
        config = QuickstartConfig(
            out=out,
            recipe=recipe,
            overrides=tuple(overrides or ()),
            num_images=num_images,
            world_seed=world_seed,
            tokenizer_steps=tokenizer_steps,
            segmenter_steps=segmenter_steps,
            eval_limit=eval_limit,
            gallery=gallery,
            baseline_steps=baseline_steps,
            **({"base": None} if from_scratch else {"base": base} if base is not None else {}),
        )
        if from_scratch and base is not None:
            _fail("--base and --from-scratch exclude each other")
        typer.echo(f"starting from {config.base or 'random weights (--from-scratch)'}")
        report = run_quickstart(config, echo=typer.echo)
        if export is not None:
            command = "perceptio quickstart " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
            typer.echo(f"exported: {export_quickstart_model(config, export, command=command)}")
    except (
        FileExistsError,
        ConfigError,
        DataError,
        FileNotFoundError,
        FloatingPointError,
        IncompleteEvaluationError,
        RunFolderLockedError,
        ValueError,
    ) as err:
        _fail(str(err).strip('"'))
    typer.echo(f"report: {report}")


experiment_app = typer.Typer(help="Controlled experiments on the synthetic world.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@app.command()
def demo(
    model: Annotated[
        Path | None, typer.Option(help="A model folder; default: the tiny Perceptio model shipped with the package.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to serve on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: Gradio's, from 7860).")] = None,
    hardblink: Annotated[
        Path | None, typer.Option(help="A HardBLINK folder: a few of its questions become examples.")
    ] = None,
) -> None:
    """A web page that shows what the model sees: the answer, the masks on the image, the decoded depth map with
    the marker letters, the generated sequence and its depth-span grid, and the latency."""
    try:
        import gradio  # noqa: F401 - only to say how to install it
    except ImportError:
        _fail("the demo needs gradio: pip install 'perceptio[demo]' (or make browser)")
    from perceptio.demo.app import launch

    if model is not None and not (model / "config.json").is_file():
        _fail(f"{model}: not a model folder (no config.json); give a perceptio train model/ folder")
    typer.echo(f"serving on http://{host}:{port or 7860} (Ctrl+C stops)", err=True)
    launch(model, host=host, port=port, hardblink=hardblink)


@experiment_app.command("spatial-cot")
def experiment_spatial_cot(
    out: Annotated[Path, typer.Option(help="Experiment folder (reused and resumed when it exists).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value recipe overrides applied to every arm.")
    ] = None,
    budget_minutes: Annotated[
        float, typer.Option(min=0.0, help="Training budget per arm: the steps the spatial arm makes in M minutes.")
    ] = 10.0,
    steps: Annotated[int | None, typer.Option(min=1, help="Steps per arm (instead of --budget-minutes).")] = None,
    preset: Annotated[str, typer.Option(help="Model preset: tiny or smol.")] = "tiny",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per arm (0..N-1).")] = 1,
    recipe: Annotated[Path, typer.Option(help="Training recipe shared by the arms.")] = Path("configs/tiny_synth.yaml"),
    num_images: Annotated[int, typer.Option(min=10, help="Images in the synthetic world.")] = 4000,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Samples per task and split evaluated.")] = 300,
    tokenizer_steps: Annotated[int, typer.Option(min=1, help="Depth-tokenizer training steps.")] = 1500,
    segmenter_steps: Annotated[int, typer.Option(min=1, help="SAM2 pretraining steps.")] = 1500,
    jobs: Annotated[int | None, typer.Option(min=1, help="Processes at once (default: the number of cores).")] = None,
    arms: Annotated[
        str, typer.Option(help="Comma-separated arms to run: spatial, direct, no_marker_count.")
    ] = "spatial,direct,no_marker_count",
    base: Annotated[
        Path | None,
        typer.Option(help="Fine-tune every arm from this pretrained base (default: the shipped tiny base, tiny only)."),
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train every arm from the preset's random weights.")
    ] = False,
) -> None:
    """Train and evaluate, on the same data and budget, Perceptio with spatial tokens before the answer, the same
    model answering directly, and Perceptio without the marker and count losses; write results.md."""
    from perceptio.experiments.spatial_cot import SpatialCotConfig, run_spatial_cot

    if not recipe.is_file():
        _fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    budget = f"--steps {steps}" if steps is not None else f"--budget-minutes {budget_minutes:g}"
    if from_scratch and base is not None:
        _fail("--base and --from-scratch exclude each other")
    if base is None and not from_scratch and preset == "tiny":
        from perceptio.weights import shipped

        try:
            base = shipped("tiny-base")
        except FileNotFoundError:
            base = None  # a checkout without the shipped weights trains from scratch, as the report says
    start = f" --base {base}" if base is not None else " --from-scratch"
    command = (
        f"perceptio experiment spatial-cot --out {out} {budget} --preset {preset} --seeds {seeds} --recipe {recipe} "
        f"--num-images {num_images} --eval-limit {eval_limit} --tokenizer-steps {tokenizer_steps} "
        f"--segmenter-steps {segmenter_steps} --arms {arms}{start}" + "".join(f" {o}" for o in overrides or [])
    )
    try:
        config = SpatialCotConfig(
            command=command,
            out=out,
            preset=preset,
            recipe=recipe,
            overrides=tuple(overrides or ()),
            steps=steps,
            budget_minutes=budget_minutes,
            seeds=seeds,
            num_images=num_images,
            eval_limit=eval_limit,
            tokenizer_steps=tokenizer_steps,
            segmenter_steps=segmenter_steps,
            arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
            base=base,
            **({"jobs": jobs} if jobs else {}),
        )
        run_spatial_cot(config, echo=typer.echo)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results in {out / 'results.md'} and {out / 'results.json'}")


@app.command()
def pretrain(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the base recipe, e.g. run.steps=2000.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder; the base model is written to OUT/base.")] = Path("runs/base"),
    recipe: Annotated[Path, typer.Option(help="The base recipe.")] = Path("configs/tiny_base.yaml"),
    world: Annotated[
        Path | None, typer.Option(help="Use this rendered world (perceptio data synth) instead of rendering one.")
    ] = None,
    num_images: Annotated[int, typer.Option(min=10, help="Images in the pretraining world.")] = 20000,
    world_seed: Annotated[int, typer.Option(help="Seed of the pretraining world (not the quickstart's 0).")] = 1,
    tokenizer_steps: Annotated[int, typer.Option(min=1, help="Depth-tokenizer training steps.")] = 1500,
    segmenter_steps: Annotated[int, typer.Option(min=1, help="SAM2 pretraining steps.")] = 1500,
) -> None:
    """Pretrain the tiny base (the tiny counterpart of pretrained InternVL + SAM2): render a large world, train the
    depth tokenizer and SAM2, then the VLM on text-only alignment tasks; write OUT/base with its model card.

    Resumable: run the same command again after an interruption.
    """
    from perceptio.config import ConfigError
    from perceptio.data.errors import DataError
    from perceptio.pretrain import PretrainConfig, run_pretrain
    from perceptio.utils.runlock import RunFolderLockedError

    if not recipe.is_file():
        _fail(f"recipe {recipe} not found; run from the repository root or pass --recipe PATH")
    source = f"--world {world}" if world is not None else f"--num-images {num_images} --world-seed {world_seed}"
    command = (
        f"perceptio pretrain --out {out} --recipe {recipe} {source} "
        f"--tokenizer-steps {tokenizer_steps} --segmenter-steps {segmenter_steps}"
        + "".join(f" {o}" for o in overrides or [])
    )
    try:
        config = PretrainConfig(
            out=out,
            recipe=recipe,
            world=world,
            overrides=tuple(overrides or ()),
            num_images=num_images,
            world_seed=world_seed,
            tokenizer_steps=tokenizer_steps,
            segmenter_steps=segmenter_steps,
            command=command,
        )
        base = run_pretrain(config, echo=typer.echo)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError, RunFolderLockedError, ValueError) as err:
        _fail(str(err).strip('"'))
    typer.echo(f"base model: {base} (model card: {base / 'MODEL_CARD.md'})")


@experiment_app.command("grounding")
def experiment_grounding(
    out: Annotated[Path, typer.Option(help="Experiment folder (finished jobs are reused).")],
    world: Annotated[
        Path | None,
        typer.Option(
            help="A rendered world (perceptio data synth); levels L2-L4 read its VQA, L5 its relative-depth "
            "questions, L6 its referring expressions."
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="L5's trained depth tokenizer (default: `tokenizer` next to the world).")
    ] = None,
    segmenter: Annotated[
        Path | None, typer.Option(help="L6's pretrained SAM2 (default: `segmenter` next to the world).")
    ] = None,
    levels: Annotated[
        str, typer.Option(help=f"Comma-separated levels, of: {', '.join(f'{k} ({v})' for k, v in LEVELS.items())}.")
    ] = "L0,L1,L2,L3,L4",
    arms: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated arms, of: {', '.join(LADDER_ARMS)} (base: fine-tune the pretrained base; "
            "segrms: seg_prompt_rms 0.5; pos: image_token_pos sincos; vinit: vision_init_std 0.1)."
        ),
    ] = "baseline,center,standardize",
    base: Annotated[Path | None, typer.Option(help="The base of the base arm (default: the shipped one).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per level and arm.")] = 600,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between validation points of the curve.")] = 200,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per (level, arm).")] = 1,
    train_images: Annotated[int, typer.Option(min=2, help="Training questions per level.")] = 2000,
    val_images: Annotated[int, typer.Option(min=2, help="Validation questions per level.")] = 300,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (warm-up, cosine).")] = 1e-3,
    jobs: Annotated[int | None, typer.Option(min=1, help="Processes at once (default: the number of cores).")] = None,
) -> None:
    """The grounding ladder: train the tiny model on one capability at a time (whole-image colour, a small
    object's colour, binding, left/right, count, the closest marker through the depth span, the referred object's
    mask) for each arm (model options), and report accuracy, the answer prior and the image-use gap (val loss with
    shuffled images minus with the right ones)."""
    from perceptio.experiments.grounding import GroundingConfig, run_grounding

    try:
        config = GroundingConfig(
            out=out,
            world=world,
            levels=tuple(x.strip() for x in levels.split(",") if x.strip()),
            arms=tuple(x.strip() for x in arms.split(",") if x.strip()),
            steps=steps,
            eval_every=eval_every,
            seeds=seeds,
            train_images=train_images,
            val_images=val_images,
            lr=lr,
            base=base,
            tokenizer=tokenizer,
            segmenter=segmenter,
            **({"jobs": jobs} if jobs else {}),
        )
        run_grounding(config, echo=typer.echo)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results in {out / 'results.md'} and {out / 'results.json'}")


#: File-system errors that are the user's to fix (permissions, a full or read-only disk, a file where a folder
#: should be): one line and exit 2. Any other OSError keeps its traceback.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}


def main() -> None:
    """Entry point of the `perceptio` console script."""
    try:
        app(prog_name="perceptio")
    except UserError as err:  # a command that did not catch it itself: still one line, exit 2
        typer.secho(f"error: {str(err).strip(chr(34))}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:
            raise
        where = f" {err.filename}" if err.filename else ""
        typer.secho(
            f"error: cannot use{where}: {err.strerror}. Fix: choose a path you can write to (e.g. another --out), "
            "free disk space, or fix the permissions",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
