"""The named loss terms on hand-made logits: their values, and zero (but attached) when targets are absent."""

from __future__ import annotations

import math

import pytest
import torch

from perceptio.losses import (
    IGNORE_INDEX,
    depth_count_loss,
    depth_marker_loss,
    depth_recon_loss,
    depth_token_loss,
    full_span_codes,
    mask_bce_loss,
    mask_dice_loss,
    sequence_loss_terms,
    text_loss,
)
from perceptio.tokenizers.depth import DepthTokenizer, DepthTokenizerConfig

V, START, END, CODES = 8, 2, 3, range(4, 7)  # text ids 0, 1, 7; markers 2, 3; codes 4, 5, 6
X = IGNORE_INDEX


def test_text_loss_skips_span_tokens_and_ignored_positions() -> None:
    logits = torch.zeros(1, 5, V)
    logits[0, 0, 0] = 2.0
    targets = torch.tensor([[0, 2, 4, 1, X]])
    loss = text_loss(logits, targets, exclude_ids=[START, END, *CODES])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 7)) + math.log(8)) / 2  # positions 0 and 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_depth_token_loss_uses_only_the_code_logits() -> None:
    logits = torch.zeros(1, 3, V)
    logits[0, :, 0] = 100.0  # a huge text logit must not matter: the softmax is over the codes only
    logits[0, 1, 4] = 1.0
    targets = torch.tensor([[1, 4, 6]])  # code 4 at t=1, code 6 at t=2
    expected = (-math.log(math.e / (math.e + 2)) + math.log(3)) / 2
    assert depth_token_loss(logits, targets, code_ids=CODES).item() == pytest.approx(expected, rel=1e-6)


def test_depth_marker_loss_averages_each_marker_separately() -> None:
    logits = torch.zeros(1, 4, V)
    logits[0, 0, START] = math.log(7.0)  # p(start) = 7/14 = 0.5 at t=0
    targets = torch.tensor([[START, START, 5, END]])  # two starts (p 0.5 and 1/8), one end (1/8)
    start_term = (math.log(2) + math.log(8)) / 2
    expected = (start_term + math.log(8)) / 2
    assert depth_marker_loss(logits, targets, start_id=START, end_id=END).item() == pytest.approx(expected, rel=1e-6)


def test_depth_count_loss_by_hand() -> None:
    logits = torch.zeros(2, 4, V)  # uniform: P(any code) = 3/8 per position, p(end) = 1/8
    targets = torch.tensor([[START, 4, 5, END], [0, 1, 7, X]])  # the second sequence has no span
    expected = abs(2 * 3 / 8 - 2) / 2 + math.log(8)
    assert depth_count_loss(logits, targets, code_ids=CODES, end_id=END, span_length=2).item() == pytest.approx(
        expected
    )
    confident = torch.zeros(1, 4, V)
    confident[0, 1:3, 4:7] = 20.0
    confident[0, 3, END] = 20.0
    low = depth_count_loss(confident, targets[:1], code_ids=CODES, end_id=END, span_length=2).item()
    assert low < 1e-6


def test_depth_recon_loss_is_zero_for_confident_right_codes_and_differentiable() -> None:
    config = DepthTokenizerConfig(input_size=16, channels=(8, 16), num_res_blocks=0, code_dim=4, num_codes=3)
    tok = DepthTokenizer(config).eval().requires_grad_(False)
    span = config.num_tokens  # 4x4 grid = 16 codes
    target_codes = torch.randint(0, 3, (1, span))
    targets = torch.cat([torch.tensor([[START]]), target_codes + CODES.start, torch.tensor([[END]])], dim=1)
    logits = torch.zeros(1, span + 2, V)
    logits[0, 1 : span + 1] = torch.nn.functional.one_hot(target_codes[0] + CODES.start, V) * 50.0
    args = {
        "code_ids": CODES,
        "span_length": span,
        "decode_soft": tok.decode_soft,
        "decode": lambda c: tok.decode(c.view(-1, 4, 4)),
    }
    assert depth_recon_loss(logits, targets, **args).item() < 1e-8
    noisy = torch.randn(1, span + 2, V, requires_grad=True)
    loss = depth_recon_loss(noisy, targets, **args)
    loss.backward()
    assert loss.item() >= 0 and noisy.grad is not None and float(noisy.grad[0, 1 : span + 1, 4:7].abs().sum()) > 0
    assert float(noisy.grad[0, 1 : span + 1, :4].abs().sum()) == 0  # only the code logits take part
    # the reference decoded beforehand (from full_span_codes) instead of decode: the same loss
    codes = full_span_codes(targets, code_ids=CODES, span_length=span)
    assert torch.equal(codes, target_codes)
    reference = tok.decode(codes.view(-1, 4, 4))
    ahead = depth_recon_loss(
        noisy, targets, code_ids=CODES, span_length=span, decode_soft=tok.decode_soft, reference=reference
    )
    assert torch.equal(ahead, loss)
    with pytest.raises(ValueError, match="exactly one of decode or reference"):
        depth_recon_loss(noisy, targets, **args, reference=reference)
    with pytest.raises(ValueError, match="compute it from full_span_codes"):
        depth_recon_loss(noisy, targets, **{**args, "decode": None}, reference=reference[:, :2])


def test_span_terms_of_a_batch_are_the_mean_of_each_sequence_alone() -> None:
    """depth_count and depth_recon average per-span terms: a batch gives the mean over its sequences with a (full)
    span, each as if alone, whatever the spans' positions and the sequences without one."""
    torch.manual_seed(0)  # before the tokenizer's random weights: a test whose values do not depend on the order
    config = DepthTokenizerConfig(input_size=8, channels=(8, 8), num_res_blocks=0, code_dim=4, num_codes=3)
    tok = DepthTokenizer(config).eval().requires_grad_(False)
    span = config.num_tokens  # 2x2 grid = 4 codes
    targets = torch.full((5, 12), X)
    for b, (at, length) in enumerate([(0, span), (3, span), (2, 2), (6, span)]):  # sequence 4: no span at all
        targets[b, at] = START
        targets[b, at + 1 : at + 1 + length] = torch.randint(CODES.start, CODES.stop, (length,))
        targets[b, at + 1 + length] = END
    targets[1, 0] = 7  # some text before a span
    logits = torch.randn(5, 12, V)
    count = {"code_ids": CODES, "end_id": END, "span_length": span}
    recon = {
        "code_ids": CODES,
        "span_length": span,
        "decode_soft": tok.decode_soft,
        "decode": lambda c: tok.decode(c.view(-1, 2, 2)),
    }
    alone = [depth_count_loss(logits[b : b + 1], targets[b : b + 1], **count) for b in range(4)]
    # (rel 1e-5: a batched decoder pass adds in another order than three single ones)
    batched = depth_count_loss(logits, targets, **count).item()
    assert batched == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)
    full = [depth_recon_loss(logits[b : b + 1], targets[b : b + 1], **recon) for b in (0, 1, 3)]  # 2: 2 codes only
    batched = depth_recon_loss(logits, targets, **recon).item()
    assert batched == pytest.approx(torch.stack(full).mean().item(), rel=1e-5)


def test_mask_losses_by_hand() -> None:
    logits = torch.zeros(1, 2, 2)
    masks = torch.ones(1, 2, 2)
    assert mask_bce_loss(logits, masks).item() == pytest.approx(math.log(2))
    assert mask_dice_loss(logits, masks).item() == pytest.approx(1 - (2 * 2 + 1) / (2 + 4 + 1))
    perfect = torch.full((1, 2, 2), 30.0)
    assert mask_dice_loss(perfect, masks).item() == pytest.approx(0.0, abs=1e-6)


def test_every_term_is_zero_but_attached_when_its_targets_are_absent() -> None:
    logits = torch.randn(1, 3, V, requires_grad=True)
    text_only = torch.tensor([[0, 1, X]])
    none = torch.full((1, 3), X)
    terms = [
        text_loss(logits, none),
        depth_token_loss(logits, text_only, code_ids=CODES),
        depth_marker_loss(logits, text_only, start_id=START, end_id=END),
        depth_count_loss(logits, text_only, code_ids=CODES, end_id=END, span_length=2),
        depth_recon_loss(logits, text_only, code_ids=CODES, span_length=2, decode_soft=None, decode=None),  # type: ignore[arg-type]
    ]
    mask_logits = torch.zeros(0, 4, 4, requires_grad=True)
    terms += [mask_bce_loss(mask_logits, torch.zeros(0, 4, 4)), mask_dice_loss(mask_logits, torch.zeros(0, 4, 4))]
    for term in terms:
        assert term.item() == 0.0 and term.requires_grad
    sum(terms).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def _separate_terms(logits: torch.Tensor, targets: torch.Tensor, **recon: object) -> dict[str, torch.Tensor]:
    span = {"code_ids": CODES, "span_length": recon["span_length"]}
    return {
        "text": text_loss(logits, targets, exclude_ids=[START, END, *CODES]),
        "depth_token": depth_token_loss(logits, targets, code_ids=CODES),
        "depth_marker": depth_marker_loss(logits, targets, start_id=START, end_id=END),
        "depth_count": depth_count_loss(logits, targets, end_id=END, **span),  # type: ignore[arg-type]
        "depth_recon": depth_recon_loss(logits, targets, **recon),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("seed", range(8))
def test_the_fused_sequence_terms_equal_the_separate_terms_with_their_gradients(seed: int) -> None:
    """Random batches of full and partial spans (with or without an end marker), text around them, markers alone,
    sequences with nothing supervised: every term and the logits' gradient as the five functions give them."""
    config = DepthTokenizerConfig(input_size=8, channels=(8, 8), num_res_blocks=0, code_dim=4, num_codes=3)
    tok = DepthTokenizer(config).eval().requires_grad_(False)
    span = config.num_tokens  # 2x2 grid = 4 codes
    generator = torch.Generator().manual_seed(seed)
    batch, length = int(torch.randint(1, 7, (1,), generator=generator)), 14
    targets = torch.full((batch, length), X)
    for b in range(batch):
        kind = int(torch.randint(0, 6, (1,), generator=generator))
        at = int(torch.randint(0, 4, (1,), generator=generator))
        targets[b, :at] = torch.tensor([0, 1, 7, 0][:at])  # some text first
        if kind == 5:
            continue  # text only (or nothing)
        codes = {0: span, 1: span, 2: 2, 3: span, 4: 0}[kind]
        targets[b, at] = START
        targets[b, at + 1 : at + 1 + codes] = torch.randint(CODES.start, CODES.stop, (codes,), generator=generator)
        if kind != 3:  # 3: a full span that does not end
            targets[b, at + 1 + codes] = END
            targets[b, at + 2 + codes : at + 4 + codes] = 1
    logits = (3 * torch.randn(batch, length, V, generator=generator)).requires_grad_(True)
    recon = {"code_ids": CODES, "span_length": span, "decode_soft": tok.decode_soft}
    full = full_span_codes(targets, code_ids=CODES, span_length=span)
    reference = None if full is None else tok.decode(full.view(-1, 2, 2))
    fused = sequence_loss_terms(logits, targets, start_id=START, end_id=END, reference=reference, **recon)
    separate = _separate_terms(logits, targets, decode=lambda c: tok.decode(c.view(-1, 2, 2)), **recon)
    assert fused.keys() == separate.keys()
    for name, value in separate.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert fused[name].requires_grad
    (fused_grad,) = torch.autograd.grad(sum(fused.values()), logits)
    (separate_grad,) = torch.autograd.grad(sum(separate.values()), logits)
    torch.testing.assert_close(fused_grad, separate_grad, rtol=1e-5, atol=1e-6)


def test_the_fused_sequence_terms_refuse_what_depth_recon_loss_refuses() -> None:
    targets = torch.tensor([[START, 4, 5, END]])
    args = {"code_ids": CODES, "start_id": START, "end_id": END, "span_length": 2, "decode_soft": lambda **kw: kw}
    with pytest.raises(ValueError, match="exactly one of decode or reference"):
        sequence_loss_terms(torch.randn(1, 4, V), targets, **args)  # type: ignore[arg-type]
