"""`perceptio data`: make, check and look at datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    fail,
    print_table,
)

data_app = typer.Typer(help="Make, check and look at datasets.", no_args_is_help=True)

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
    print_table(rows)
    skipped = sum(summary.relative_depth_skipped.values())
    if skipped:
        typer.echo(
            f"{skipped} image(s) had no mid-height points with clear depth gaps for their marker question: "
            f"{dict(summary.relative_depth_skipped)}"
        )


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
    workers: Annotated[
        int | None,
        typer.Option(
            min=0, help="Processes rendering scenes (default: one per core; 0: this one). The files are the same."
        ),
    ] = None,
) -> None:
    """Render the synthetic spatial world and write it in the real formats (RefCOCO, HardBLINK, MMBench, ...)."""
    from perceptio.data.synthetic import WorldConfig, default_render_workers, generate_world

    try:
        summary = generate_world(
            out,
            num_images=num_images,
            seed=seed,
            config=WorldConfig(image_size=size, noise=noise),
            overwrite=overwrite,
            workers=default_render_workers(num_images) if workers is None else workers,
        )
    except (FileExistsError, ValueError) as err:
        fail(str(err))
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
        fail(str(err))
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
        fail(f"unknown --format {format!r}; use one of {sorted(READERS)}")
    given = {"split": split, "dataset": dataset if dataset != "refcoco" else None, "image_root": image_root}
    unused = sorted(k for k, v in given.items() if v is not None and k not in _CHECK_OPTIONS[format])
    if unused:
        names = ", ".join("--" + k.replace("_", "-") for k in unused)
        fail(f"--format {format} does not take {names}; it takes {sorted(_CHECK_OPTIONS[format]) or 'no options'}")
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
        fail(f"{err}\n(re-run with --skip-bad to list every bad item)")
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
        fail(f"no sample of {path} decoded cleanly; nothing here can be trained or evaluated on")
