"""Rendering speed of the synthetic world, on one core.

Target (issue 2): 1,000 images at 128x128 render in under a minute on one core.

Prints two figures from one run: the renderer alone (scene sampling + ray casting + visibility check) and the
whole world generation (rendering, task derivation and writing every format to disk).

    .venv/bin/python bench/render.py [--num-images 1000] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says (numpy here is single-threaded anyway)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    from perceptio.data.synthetic import WorldConfig, generate_world, render_world_scene

    config = WorldConfig(image_size=args.size)
    start = time.perf_counter()
    for index in range(args.num_images):
        render_world_scene(0, index, config)
    render_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_world(f"{tmp}/world", num_images=args.num_images, seed=0, config=config, progress=False)
        world_s = time.perf_counter() - start

    n = args.num_images
    print(f"images: {n} at {args.size}x{args.size}, 1 process")
    print(f"render only       : {render_s:6.1f} s  ({n / render_s:6.1f} images/s, {1000 * render_s / n:5.1f} ms/image)")
    print(f"full world to disk: {world_s:6.1f} s  ({n / world_s:6.1f} images/s, {1000 * world_s / n:5.1f} ms/image)")
    verdict = "meets" if render_s * 1000 / n < 60 else "MISSES"
    print(f"target: 1,000 images in < 60 s -> render {render_s * 1000 / n:.1f} s per 1,000 ({verdict})")


if __name__ == "__main__":
    main()
