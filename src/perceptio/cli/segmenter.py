"""`perceptio segmenter`: pretrain SAM2 with point and box prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from perceptio.cli._common import config_command, fail
from perceptio.train.config import SegmenterPretrainConfig

segmenter_app = typer.Typer(help="Pretrain the SAM2 segmenter with point and box prompts.", no_args_is_help=True)


@segmenter_app.command("pretrain")
@config_command(SegmenterPretrainConfig, "steps", "batch_size", "lr", "seed")
def segmenter_pretrain(
    settings: dict[str, Any],
    data: Annotated[Path, typer.Option(help="A refer root (refs(unc).p + instances.json), e.g. a synthetic world.")],
    out: Annotated[Path, typer.Option(help="Output folder: the SAM2 checkpoint and pretraining.json.")],
    preset: Annotated[str, typer.Option(help="Model preset whose segmenter architecture is trained.")] = "tiny",
    image_root: Annotated[Path | None, typer.Option(help="Images (default: the refer layout's own).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out (same settings).")
    ] = False,
) -> None:
    """Train a SAM2 on object masks with point/box prompts; report its point-prompted cIoU on the val split."""
    from perceptio.data.errors import DataError
    from perceptio.train.segmenter import pretrain_on_refer

    try:
        config = SegmenterPretrainConfig(**settings)
        reference = pretrain_on_refer(data, out, config, preset=preset, image_root=image_root, resume=resume)
    except (DataError, ValueError, FileExistsError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(
        f"saved the segmenter to {out}; point-prompted val cIoU {reference['ciou']:.3f}, gIoU {reference['giou']:.3f} "
        f"({reference['objects']} expressions)"
    )
