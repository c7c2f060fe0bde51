"""GPU benchmark of Perceptio at the paper's sizes, with random weights in bf16: training step and generation.

Sizes (the public configurations; random weights, nothing downloaded):

- ``internvl3-1b``: InternViT-300M (448 px, patch 14, 256 image tokens) + a Qwen2.5-0.5B-sized language model
  (24 layers, width 896, 151,674-row vocabulary, tied head), SAM2.1-Hiera-L (1024 px), the AURORA depth tokenizer
  (320 px, 10x10 = 100 codes); the trainable policy of ``configs/paper_internvl3_1b.yaml`` (LoRA r = 256 on the
  language model, projector, [SEG] projection and SAM2's mask decoder);
- ``internvl3-8b``: the same with a Qwen2.5-7B-sized language model (28 layers, width 3584) and
  ``configs/paper_internvl3_8b.yaml``;
- ``tiny``: the tiny preset (its 64-code span), so that the script runs on a CPU in seconds (tests).

Training (per activation-checkpointing setting, off and on): seconds per optimiser step (forward, backward, AdamW)
on a batch of referring-segmentation-plus-depth samples (a [SEG] token, a 100-code span and a short answer per
sample, one target mask each), tokens/s (non-padding tokens of the batch per second), peak memory
(``torch.cuda.max_memory_allocated``), and model FLOPs utilisation:

    MFU = FLOPs(step) / (seconds per step x peak FLOP/s of the device)

FLOPs(step) is counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward
(matrix products, convolutions and attention; elementwise work is not counted, nor the optimiser). Frozen parts
cost their forward (and the backward of their activations where gradients pass through), not a weight gradient;
the vision tower, SAM2 and the depth decoder add their own work. The common estimate, 6 x language-model
parameters x tokens, is printed beside it ("6N MFU"). The peak is bf16 dense from a table of known GPUs
(``--peak-tflops`` for others); a CPU gets no MFU.

Generation (batch 1 and 8): ms per query for a depth span (100 codes; tiny: 64) + 12 answer tokens, for
transformers' ``generate`` (the span grammar as a logits processor), the decode loop, the loop with parallel span
decoding, and the loop with a compiled step (CUDA, or ``--compile``). The memory-bandwidth floor of a one-token
step is the bytes of weights it reads (the language model's layers and its LM head) over the measured device
bandwidth (a large copy); the table shows it beside the loop's measured ms per forward.

    .venv/bin/python bench/gpu.py [--size internvl3-1b|internvl3-8b|tiny] [--device cuda] [--batch-size 4]
        [--steps 5] [--queries 8] [--compile] [--dtype bfloat16|float32] [--json results.json]

Not run on a GPU yet (none has been lent to the project); ``tests/test_bench_gpu.py`` runs it on a CPU at the tiny
size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VOCAB_ROWS = 151_674  # InternVL3's text vocabulary (Qwen2.5 + InternVL's image tokens)
VISION_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": 448,
    "patch_size": 14,
}
QWEN_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
QWEN_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
SIZES = {
    "internvl3-1b": (QWEN_05B, "configs/paper_internvl3_1b.yaml"),
    "internvl3-8b": (QWEN_7B, "configs/paper_internvl3_8b.yaml"),
    "tiny": (None, "configs/tiny_synth.yaml"),
}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


def sam2_hiera_large():  # noqa: ANN201 - transformers.Sam2Config
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    dims = [144, 288, 576, 1152]
    backbone = Sam2HieraDetConfig(
        hidden_size=dims[0],
        blocks_per_stage=[2, 6, 36, 4],
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[2, 4, 8, 16],
        window_size_per_stage=[8, 4, 16, 8],
        global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
    )
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=dims[::-1])
    config = Sam2Config(vision_config=vision)
    config.mask_decoder_config.dynamic_multimask_via_stability = False
    return config


def build(size: str, device: torch.device, dtype: torch.dtype):  # noqa: ANN201 - (model, processor, recipe path)
    from transformers import InternVLConfig

    from perceptio.models import PRESETS, PerceptioConfig, PerceptioForConditionalGeneration, PerceptioProcessor
    from perceptio.models.text_tokenizer import IMAGE_TOKENS
    from perceptio.tokenizers.depth import DepthTokenizerConfig

    text, recipe = SIZES[size]
    tokenizer = PRESETS["tiny"].text_tokenizer()  # ids only matter for speed; the rows are the real vocabulary's
    if text is None:
        config = PRESETS["tiny"].config(tokenizer)
    else:
        vlm = InternVLConfig(
            vision_config=VISION_300M,
            text_config={"model_type": "qwen2", "vocab_size": VOCAB_ROWS, "rope_theta": 1e6, **text},
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
            image_seq_length=256,
            downsample_ratio=0.5,
        )
        config = PerceptioConfig(vlm_config=vlm, segmenter_config=sam2_hiera_large())
        config.depth_tokenizer_config = DepthTokenizerConfig.from_preset("aurora").to_dict()  # 10x10 = 100 codes
    torch.manual_seed(0)
    with torch.device(device):
        model = PerceptioForConditionalGeneration(config)
    model.register_text_tokenizer(tokenizer)
    model.to(device=device, dtype=dtype)
    return model, PerceptioProcessor.for_config(model.config, tokenizer), ROOT / recipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def training_batch(model, processor, batch_size: int, device: torch.device) -> dict:  # noqa: ANN001
    """Referring segmentation with a depth span: a segmentation token, the codes, an answer; one target mask per
    sample."""
    vocab = model.config.vocab
    rng = np.random.default_rng(0)
    side = max(processor.sam_image_size, 64)
    images = _images(batch_size, side)
    queries = ["Please segment the red cube in this image, then tell which point is the closest."] * batch_size
    targets = []
    for _ in range(batch_size):
        codes = rng.integers(0, vocab.num_depth_codes, size=vocab.depth_grid)
        targets.append(f"{vocab.seg_token} {vocab.render_depth_span(codes)} Point A is the closest: (A).")
    batch = dict(processor(images, queries, targets))
    masks = [torch.from_numpy(rng.random((1, side, side)) > 0.5) for _ in range(batch_size)]
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    batch["sam_pixel_values"] = batch["sam_pixel_values"].to(model.dtype)
    batch["gt_masks"] = [m.to(device) for m in masks]
    return batch


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The device's bf16 dense peak in FLOP/s (None on a CPU: MFU is a GPU figure)."""
    if override:
        return override * 1e12, "given"
    if device.type != "cuda":
        return None, "CPU: no MFU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}, bf16 dense"
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its bf16 dense peak)")


def bench_training(model, processor, recipe: Path, args, device) -> list[dict]:  # noqa: ANN001
    from torch.utils.flop_counter import FlopCounterMode

    from perceptio.config import load_config
    from perceptio.train.config import TrainConfig
    from perceptio.train.policy import apply_policy

    trainable, _ = apply_policy(model, load_config(TrainConfig, recipe).trainable)
    trainable.train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    batch = training_batch(model, processor, args.batch_size, device)
    tokens = int(batch["attention_mask"].sum())
    peak, peak_source = peak_flops(device, args.peak_tflops)
    language = model.vlm.model.language_model
    n_language = sum(p.numel() for p in language.parameters())
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.vlm.gradient_checkpointing_disable()

        def step() -> None:
            output = trainable(**batch)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (allocations, kernels)
        counter = FlopCounterMode(display=False)
        with counter:
            output = trainable(**batch)
            output.loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append(
            {
                "activation_checkpointing": checkpointing,
                "seconds_per_step": seconds,
                "tokens_per_s": tokens / seconds,
                "counted_tflops_per_step": flops / 1e12,
                "mfu": flops / (seconds * peak) if peak else None,
                "mfu_6n_language_model": 6 * n_language * tokens / (seconds * peak) if peak else None,
                "peak_memory_gib": memory,
                "peak_tflops": peak / 1e12 if peak else None,
                "peak_source": peak_source,
                "batch_size": args.batch_size,
                "tokens_per_step": tokens,
            }
        )
    model.vlm.gradient_checkpointing_disable()
    return rows


def bandwidth(device: torch.device) -> float:
    """Bytes per second of a large on-device copy (read + write)."""
    size = 2**30 if device.type == "cuda" else 2**27
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    return 2 * size * 5 / (time.perf_counter() - start)


def bench_generation(model, processor, args, device) -> list[dict]:  # noqa: ANN001
    from perceptio.models.decoding import divergences, greedy_decode, reference_decode
    from perceptio.models.generation import SpanGrammar

    model.eval()
    ids = model.config.resolved_token_ids
    span = model.config.vocab.span_length
    grammar = SpanGrammar(ids, span, model.vlm.lm_head.out_features, require_span=True, device=device)
    ends = {"end_id": processor.turn_end_id, "pad_id": processor.text_tokenizer.pad_token_id}
    budget = span + 12
    language = model.vlm.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in language.named_parameters() if "embed" not in n)
    weight_bytes += model.vlm.lm_head.weight.numel() * model.vlm.lm_head.weight.element_size()
    floor_ms = 1000 * weight_bytes / bandwidth(device)
    modes = [("generate", None, False), ("loop", 1, False), ("loop, span 16", 16, False)]
    if args.compile or device.type == "cuda":
        modes += [("compiled loop, span 16", 16, True)]
    rows = []
    for batch_size in (1, 8):
        images = _images(args.queries, 448)
        prompts = ["What is the depth map for the image? Which point is the closest?"] * args.queries
        batches = []
        for i in range(0, args.queries, batch_size):
            batch = processor(images[i : i + batch_size], prompts[i : i + batch_size]).to(device)
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            batches.append(batch)
        reference = None
        for label, window, compile in modes:

            def run(window=window, compile=compile, batches=batches) -> list:  # noqa: ANN001
                out = []
                for b in batches:
                    inputs = (model.vlm, b["input_ids"], b["attention_mask"], b["pixel_values"], grammar)
                    if window is None:
                        out.append(reference_decode(*inputs, max_new_tokens=budget, **ends))
                    else:
                        options = {"jacobi": window, "compile": compile, "seg_id": ids.seg}
                        out.append(greedy_decode(*inputs, max_new_tokens=budget, **options, **ends))
                return out

            run()  # warm-up; compiles the step for every shape met
            _sync(device)
            start = time.perf_counter()
            decoded = run()
            _sync(device)
            seconds = time.perf_counter() - start
            forwards = sum(d.forwards * d.tokens.shape[0] for d in decoded) / args.queries
            batch_forwards = sum(d.forwards for d in decoded)  # forwards run, each over a whole batch
            ties = clear = 0
            if reference is None:
                reference, reference_seconds = decoded, seconds
            else:
                for b, ref, new in zip(batches, reference, decoded, strict=True):
                    found = divergences(model.vlm, b["input_ids"], b["attention_mask"], b["pixel_values"], ref, new)
                    ties += sum(d.is_tie() for d in found)
                    clear += sum(not d.is_tie() for d in found)
            rows.append(
                {
                    "batch_size": min(batch_size, args.queries),
                    "mode": label,
                    "ms_per_query": 1000 * seconds / args.queries,
                    "speed_up": reference_seconds / seconds,
                    "forwards_per_query": forwards,
                    "ms_per_forward": 1000 * seconds / batch_forwards,
                    "bandwidth_floor_ms_per_forward": floor_ms,
                    "differ_at_ties": ties,
                    "differ_clearly": clear,
                }
            )
    return rows


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["  ".join(f"{title:>{len(title)}}" for _, title, _ in columns)]
    for row in rows:
        cells = []
        for key, title, spec in columns:
            value = row[key]
            cells.append(f"{'-' if value is None else format(value, spec):>{len(title)}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="internvl3-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="training samples per step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting")
    parser.add_argument("--queries", type=int, default=8, help="generation queries per batch size")
    parser.add_argument("--compile", action="store_true", help="also time a compiled step on a CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of an unlisted GPU")
    parser.add_argument("--skip", choices=("training", "generation"), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    model, processor, recipe = build(args.size, device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.size}: {params / 1e9:.3f} B parameters, {args.dtype}, random weights; {name}; torch {torch.__version__}"
    )
    results: dict = {"size": args.size, "device": name, "parameters": params}
    if args.skip != "training":
        rows = bench_training(model, processor, recipe, args, device)
        results["training"] = rows
        peak = rows[0]["peak_tflops"]
        print(
            f"\ntraining, batch {args.batch_size} ({rows[0]['tokens_per_step']} tokens per step), peak "
            f"{'-' if peak is None else f'{peak:.1f}'} TFLOP/s ({rows[0]['peak_source']}):"
        )
        print(
            _table(
                rows,
                [
                    ("activation_checkpointing", "checkpointing", ""),
                    ("seconds_per_step", "s/step", ".3f"),
                    ("tokens_per_s", "tokens/s", ".0f"),
                    ("counted_tflops_per_step", "TFLOP/step", ".2f"),
                    ("mfu", "MFU", ".1%"),
                    ("mfu_6n_language_model", "6N MFU", ".1%"),
                    ("peak_memory_gib", "peak GiB", ".1f"),
                ],
            )
        )
    if args.skip != "generation":
        rows = bench_generation(model, processor, args, device)
        results["generation"] = rows
        print(f"\ngeneration, a {model.config.vocab.span_length}-code span + 12 tokens, {args.queries} queries:")
        print(
            _table(
                rows,
                [
                    ("batch_size", "batch", "d"),
                    ("mode", "mode                  ", ""),
                    ("ms_per_query", "ms/query", ".1f"),
                    ("speed_up", "speed-up", ".2f"),
                    ("forwards_per_query", "forwards/query", ".1f"),
                    ("ms_per_forward", "ms/forward", ".2f"),
                    ("bandwidth_floor_ms_per_forward", "floor ms/forward", ".2f"),
                    ("differ_at_ties", "ties", "d"),
                ],
            )
        )
        if any(r["differ_clearly"] for r in rows):
            raise SystemExit("a decoding differed from generate at a clear logit gap: a bug")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
