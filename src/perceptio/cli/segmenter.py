"""`perceptio segmenter`: pretrain SAM2 with point and box prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perceptio.cli._common import (
    fail,
)

segmenter_app = typer.Typer(help="Pretrain the SAM2 segmenter with point and box prompts.", no_args_is_help=True)


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
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out (same settings).")
    ] = False,
) -> None:
    """Train a SAM2 on object masks with point/box prompts; report its point-prompted cIoU on the val split."""
    from perceptio.data.errors import DataError
    from perceptio.train.segmenter import SegmenterPretrainConfig, pretrain_on_refer

    try:
        config = SegmenterPretrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        reference = pretrain_on_refer(data, out, config, preset=preset, image_root=image_root, resume=resume)
    except (DataError, ValueError, FileExistsError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(
        f"saved the segmenter to {out}; point-prompted val cIoU {reference['ciou']:.3f}, gIoU {reference['giou']:.3f} "
        f"({reference['objects']} expressions)"
    )
