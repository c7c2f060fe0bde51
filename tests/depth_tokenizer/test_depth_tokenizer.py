"""The depth tokenizer: round trips, soft decoding, persistence and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from perceptio.tokenizers.depth import (
    CheckpointMismatchError,
    DepthInputError,
    DepthTokenizer,
    DepthTokenizerConfig,
    denormalize_depth,
    normalize_depth,
)
from perceptio.tokenizers.depth.train import TokenizerTrainConfig, train_tokenizer
from perceptio.vocab import DepthSpanError

SMALL = DepthTokenizerConfig(input_size=32, channels=(8, 16), num_res_blocks=1, code_dim=8, num_codes=16)


def _maps(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Synthetic normalised maps: a vertical ramp (ground) plus a bright disc (a near object)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size] / size
    maps = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        m = 0.6 * v
        m = np.where((u - cx) ** 2 + (v - cy) ** 2 < r**2, rng.uniform(0.7, 1.0), m)
        maps.append((m - m.min()) / (m.max() - m.min()))
    return torch.tensor(np.stack(maps), dtype=torch.float32)


def test_presets_have_the_decided_geometry() -> None:
    aurora = DepthTokenizer.from_preset("aurora").config
    assert (aurora.input_size, aurora.grid, aurora.num_codes, aurora.code_dim) == (320, (10, 10), 128, 512)
    assert (aurora.ema_decay, aurora.commitment_weight) == (0.99, 0.25)
    tiny = DepthTokenizer.from_preset("tiny").config
    assert (tiny.input_size, tiny.grid, tiny.num_codes) == (64, (8, 8), 32)
    with pytest.raises(KeyError, match="available"):
        DepthTokenizer.from_preset("huge")
    with pytest.raises(ValueError, match="not divisible"):
        DepthTokenizerConfig(input_size=100, channels=(8, 16, 32))


def test_encode_decode_shapes_and_ranges() -> None:
    tok = DepthTokenizer(SMALL).eval()
    codes = tok.encode(_maps(3))
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    depth = tok.decode(codes).detach()
    assert depth.shape == (3, 32, 32) and float(depth.min()) >= 0 and float(depth.max()) <= 1


def test_encode_never_updates_the_codebook() -> None:
    tok = DepthTokenizer(SMALL).train()
    tok(_maps(4))  # initialises the codebook from data
    before = {k: v.clone() for k, v in tok.quantizer.state_dict().items()}
    tok.encode(_maps(4, seed=1))
    for key, value in tok.quantizer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_decode_equals_decode_soft_of_one_hot() -> None:
    tok = DepthTokenizer(SMALL).eval()
    codes = torch.randint(0, 16, (2, 8, 8))
    one_hot = torch.nn.functional.one_hot(codes, 16).float()
    torch.testing.assert_close(tok.decode(codes), tok.decode_soft(one_hot), rtol=0, atol=1e-6)
    flat = one_hot.reshape(2, 64, 16)  # (B, N, K) is accepted too
    torch.testing.assert_close(tok.decode(codes), tok.decode_soft(flat), rtol=0, atol=1e-6)


def test_gradients_reach_the_probabilities_and_logits() -> None:
    tok = DepthTokenizer(SMALL).eval()
    for p in tok.parameters():
        p.requires_grad_(False)  # frozen, as in the model's reconstruction loss
    logits = torch.randn(2, 64, 16, requires_grad=True)
    target = torch.rand(2, 32, 32)
    torch.nn.functional.mse_loss(tok.decode_soft(logits=logits, temperature=0.8), target).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    probs = torch.softmax(torch.randn(2, 8, 8, 16), -1).requires_grad_(True)
    tok.decode_soft(probs).sum().backward()
    assert probs.grad is not None and float(probs.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="exactly one"):
        tok.decode_soft(probs, logits=logits)
    with pytest.raises(DepthInputError, match="64 positions"):
        tok.decode_soft(torch.rand(1, 63, 16))


def test_relus_in_place_give_the_same_values_and_gradients() -> None:
    """The tokenizer's ReLUs work in place (each follows a convolution): the soft decode's values and gradients,
    and a training step's, are those of ReLUs that are not."""
    torch.manual_seed(0)
    tok = DepthTokenizer(SMALL).eval()  # eval: no EMA update of the codebook between the two passes
    relus = [m for m in tok.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    logits, maps = torch.randn(3, 64, 16), _maps(3)
    results = []
    for inplace in (True, False):
        for m in relus:
            m.inplace = inplace
        tok.zero_grad()
        x = logits.clone().requires_grad_(True)
        soft = tok.decode_soft(logits=x)
        (soft.square().mean() + tok(maps).loss).backward()
        results.append([soft.detach(), x.grad, *(p.grad for p in tok.parameters() if p.grad is not None)])
    assert len(results[0]) > 2 and all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_codes_text_round_trip() -> None:
    tok = DepthTokenizer(SMALL).eval()
    codes = tok.encode(_maps(1))[0]
    text = tok.codes_to_text(codes)
    assert text.startswith("<DEPTH_START>") and text.endswith("<DEPTH_END>") and text.count("><") == 65
    torch.testing.assert_close(tok.text_to_codes(text), codes)
    one_short = re.sub(r"<DEPTH_\d+><DEPTH_END>$", "<DEPTH_END>", text)
    with pytest.raises(DepthSpanError, match="the span has 63 codes, expected 64"):
        tok.text_to_codes(one_short)


def test_save_load_gives_identical_outputs(tmp_path: Path) -> None:
    tok = DepthTokenizer(SMALL).train()
    for _ in range(3):
        tok(_maps(4))  # moves the EMA buffers away from their initial values
    tok.eval()
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = DepthTokenizer.from_pretrained(tmp_path / "ckpt")
    maps = _maps(3, seed=5)
    torch.testing.assert_close(loaded.encode(maps), tok.encode(maps), rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(loaded.encode(maps)), tok.decode(tok.encode(maps)), rtol=0, atol=0)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_codes"] == 16
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.pt"))


def test_checkpoint_config_mismatch_is_explained(tmp_path: Path) -> None:
    DepthTokenizer(SMALL).save_pretrained(tmp_path / "ckpt")
    other = DepthTokenizerConfig(**{**SMALL.to_dict(), "num_codes": 32})
    with pytest.raises(CheckpointMismatchError, match=r"num_codes \(checkpoint 16, expected 32\)"):
        DepthTokenizer.from_pretrained(tmp_path / "ckpt", expected=other)
    edited = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    edited["code_dim"] = 12
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(edited))
    with pytest.raises(
        CheckpointMismatchError, match=r"does not fit .*quantizer.codebook: weights \(16, 8\) vs config \(16, 12\)"
    ):
        DepthTokenizer.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DepthTokenizer.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (torch.full((1, 32, 32), float("nan")), "NaN or inf"),
        (torch.rand(1, 3, 32, 32), r"expected depth maps of shape \(B, 32, 32\)"),
        (torch.rand(1, 16, 16), "use DepthTokenizer.prepare"),
        (torch.randint(0, 2, (1, 32, 32)), "floating-point"),
        (torch.rand(1, 32, 32) * 5, r"normalised to \[0, 1\]"),
    ],
)
def test_bad_depth_input_is_refused(depth: torch.Tensor, message: str) -> None:
    with pytest.raises(DepthInputError, match=message):
        DepthTokenizer(SMALL).encode(depth)


def test_bad_codes_are_refused() -> None:
    tok = DepthTokenizer(SMALL)
    with pytest.raises(DepthInputError, match=r"code ids must be in \[0, 16\), got values in \[0, 16\]"):
        tok.decode(torch.cat([torch.zeros(1, 4, 8), torch.full((1, 4, 8), 16)], dim=1).long())
    with pytest.raises(DepthInputError, match="shape"):
        tok.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(DepthInputError, match="integers"):
        tok.decode(torch.zeros(1, 8, 8))


def test_normalisation_conventions_and_errors() -> None:
    depth = np.array([[1.0, 2.0], [4.0, 8.0]])
    normalized, stats = normalize_depth(depth)
    assert normalized[0, 0] == 1.0 and normalized[1, 1] == 0.0  # nearest is 1
    np.testing.assert_allclose(denormalize_depth(normalized, stats), depth, rtol=1e-6)
    disparity = 1 / depth
    np.testing.assert_allclose(normalize_depth(disparity, quantity="inverse_depth")[0], normalized, rtol=1e-6)
    with pytest.raises(DepthInputError, match="constant"):
        normalize_depth(np.full((4, 4), 3.0))
    with pytest.raises(DepthInputError, match="NaN/inf"):
        normalize_depth(np.array([[1.0, np.inf], [2.0, 3.0]]))
    with pytest.raises(DepthInputError, match="positive"):
        normalize_depth(np.array([[1.0, 0.0], [2.0, 3.0]]))
    with pytest.raises(DepthInputError, match="single"):
        normalize_depth(np.ones((2, 2, 2)))
    masked, _ = normalize_depth(np.array([[1.0, np.nan], [2.0, 4.0]]), valid=np.array([[True, False], [True, True]]))
    assert masked[0, 1] == 0.0 and masked[0, 0] == 1.0
    tok = DepthTokenizer(SMALL)
    raw = np.random.default_rng(0).uniform(1, 9, size=(50, 70))
    prepared = tok.prepare([raw])
    assert prepared.shape == (1, 32, 32) and float(prepared.min()) >= 0.0 and float(prepared.max()) <= 1.0
    same_size = np.random.default_rng(1).uniform(1, 9, size=(32, 32))
    np.testing.assert_array_equal(tok.prepare(same_size)[0].numpy(), normalize_depth(same_size)[0])


def test_round_trip_improves_with_training(tmp_path: Path) -> None:
    train_maps, held_out = _maps(64, seed=1), _maps(16, seed=2)
    untrained = DepthTokenizer(SMALL).eval()
    before = float(torch.mean((untrained.decode(untrained.encode(held_out)) - held_out) ** 2))
    config = TokenizerTrainConfig(steps=150, batch_size=16, lr=2e-3, checkpoint_every=0, log_every=50)
    trained = train_tokenizer(train_maps.numpy(), SMALL, config, tmp_path / "run", progress=False)
    after = float(torch.mean((trained.decode(trained.encode(held_out)) - held_out) ** 2))
    mean_map = float(torch.mean((train_maps.mean(0) - held_out) ** 2))
    assert after < 0.25 * before and after < 0.5 * mean_map, (before, after, mean_map)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [50, 100, 150] and log[-1]["loss"] < log[0]["loss"]
