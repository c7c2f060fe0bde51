"""Greedy decoding of Perceptio's answers: a decode loop ahead of transformers' ``generate``.

Every answer opens with a fixed-length depth span, so decoding is dominated by many cheap steps; ``generate``
spends more time in its own bookkeeping (per-step input preparation, mask building, stopping criteria, logits
processors) than in a tiny model. :func:`greedy_decode` keeps only what greedy decoding needs:

- one prefill through the whole VLM (vision tower included), then steps through the language model alone;
- a static KV cache (``transformers.StaticCache``) and an attention mask kept as one boolean tensor;
- the span grammar as precomputed tensors (:class:`~perceptio.models.generation.SpanGrammar`), and inside a
  constrained span the LM head over the span's ids alone (the only ones the grammar allows there);
- the last hidden state of every fed token kept, so the segmentation-token prompts need no second pass;
- left-padded batches (position ids as ``generate`` makes them);
- optionally ``torch.compile`` of the step (fixed shapes thanks to the static cache; it pays off over long
  evaluations, not for a handful of queries: compiling takes tens of seconds);
- optionally exact parallel decoding of the depth span (``jacobi=W``): inside a span, W tokens are guessed,
  checked in one forward, and accepted up to the first wrong guess, so the output is the greedy one. Sequences
  already past their span wait while the others finish theirs: those W-token forwards run on the sequences that
  use them alone.

The output is the same, token for token, as ``generate(do_sample=False)`` with
:class:`~perceptio.models.generation.DepthSpanLogitsProcessor` (tests compare the two, constrained and not,
batched with padding); :func:`reference_decode` is that ``generate`` call, kept for those checks and for
``bench/generation.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, LogitsProcessorList, StaticCache

from perceptio.models.generation import DepthSpanLogitsProcessor, SpanGrammar

__all__ = ["Decoded", "Divergence", "divergences", "greedy_decode", "reference_decode"]


@dataclass
class Decoded:
    """Generated ids and what decoding learnt along the way.

    Attributes:
        tokens: (B, T) generated ids; after a sequence's end-of-turn token, the pad id.
        lengths: per sequence, the number of generated ids before its end-of-turn token (T when it has none);
            with ``stop_at_seg``, up to and including its first segmentation token when it wrote one.
        seg_hidden: per sequence, (n, H) last hidden states at its generated segmentation tokens (the input
            position of each segmentation token, as in training), in order; None for the reference decoder.
        forwards: language-model forwards after the prefill.
    """

    tokens: torch.Tensor
    lengths: list[int]
    seg_hidden: list[torch.Tensor] | None
    forwards: int


class _RowView(Cache):
    """Some sequences of a static cache, for a forward of those sequences alone: each layer hands attention their
    keys and values and writes the new ones into their rows, at the cache's next slots (shared by the batch)."""

    def __init__(self, cache: StaticCache, rows: torch.Tensor) -> None:
        super().__init__(layers=cache.layers)
        self.rows = rows

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        count = key_states.shape[-2]
        slots = layer.cumulative_length + torch.arange(count, device=key_states.device)
        layer.cumulative_length.add_(count)
        rows = self.rows[:, None]
        layer.keys[rows, :, slots] = key_states.transpose(1, 2)  # (rows, slots, heads, dim)
        layer.values[rows, :, slots] = value_states.transpose(1, 2)
        return layer.keys.index_select(0, self.rows), layer.values.index_select(0, self.rows)


def _prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # as generate makes them for left padding: count real tokens; padding gets position 0
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class _Stepper:
    """Feeds tokens to the language model through the static cache, and picks the grammar's greedy tokens.

    Inside a constrained span the grammar allows only the span's ids (its codes and end marker), so the LM head
    runs on their rows alone there: at a batch of 8 the whole vocabulary's head was a fifth of a SmolLM2 step.
    """

    def __init__(self, vlm, cache: StaticCache, grammar: SpanGrammar, compile: bool) -> None:  # noqa: ANN001 - InternVLForConditionalGeneration
        self.language_model = vlm.model.language_model
        self.embed = vlm.get_input_embeddings()
        self.head = vlm.lm_head
        self.cache = cache
        self.grammar = grammar
        self.run: Callable[..., torch.Tensor] = self._forward
        if compile:
            self.run = torch.compile(self._forward, dynamic=False)
        # only a plain linear head's rows are its logits: an adapter or a hook (peft's trainable token rows, a
        # test's forcing hook) changes them, and then the whole head runs
        plain = type(self.head) is torch.nn.Linear and not (self.head._forward_hooks or self.head._forward_pre_hooks)
        self.ids = grammar.span_ids if plain else None
        if self.ids is not None:
            bias = self.head.bias
            self.ids_head = (
                self.head.weight.index_select(0, self.ids),
                None if bias is None else bias.index_select(0, self.ids),
            )
            self.ids_rows = grammar.rows[:, self.ids]  # the grammar's bias on those ids

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._through(self.cache, tokens, positions, mask)

    def _through(self, cache: Cache, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.language_model(
            inputs_embeds=self.embed(tokens),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state

    def run_rows(
        self, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The forward of the sequences ``rows`` alone (uncompiled); (B, W, H) hidden states, zeros elsewhere."""
        hidden = self._through(_RowView(self.cache, rows), tokens[rows], positions[rows], mask[rows])
        full = hidden.new_zeros(tokens.shape[0], *hidden.shape[1:])
        full[rows] = hidden
        return full

    def greedy(self, hidden: torch.Tensor, state: torch.Tensor, *, guesses: bool = False) -> torch.Tensor:
        """The grammar's greedy token after each last hidden state (..., H) of a sequence in ``state`` (...).

        ``guesses``: only the tokens of states inside a span must be right, the others are guesses.
        """
        row = self.grammar.row_of_state[state]
        if self.ids is not None and (guesses or bool((self.grammar.inside(state) >= 0).all())):
            scores = torch.nn.functional.linear(hidden, *self.ids_head).float() + self.ids_rows[row]
            return self.ids[scores.argmax(-1)]
        return (self.head(hidden).float() + self.grammar.rows[row]).argmax(-1)

    def rewind(self, count: int) -> None:
        """Forget the newest ``count`` cached positions (rejected guesses)."""
        if count:
            for layer in self.cache.layers:
                layer.cumulative_length.sub_(count)


@torch.no_grad()
def greedy_decode(
    vlm,  # noqa: ANN001 - InternVLForConditionalGeneration
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    grammar: SpanGrammar,
    *,
    max_new_tokens: int,
    end_id: int,
    pad_id: int,
    seg_id: int,
    compile: bool = False,
    jacobi: int = 1,
    stop_at_seg: bool = False,
) -> Decoded:
    """Decode greedily under ``grammar`` until every sequence ends its turn or ``max_new_tokens`` are written.

    Args:
        vlm: the model's ``InternVLForConditionalGeneration``.
        input_ids: (B, P) left-padded prompts; ``attention_mask`` (B, P) marks the real tokens.
        pixel_values: the prompts' images.
        grammar: the span grammar (its options say what is constrained).
        max_new_tokens: generation budget.
        end_id: the end-of-turn id; pad_id: what follows it; seg_id: the segmentation token.
        compile: ``torch.compile`` the step.
        jacobi: W > 1 decodes the depth span W tokens per forward (exact; 1: off).
        stop_at_seg: a sequence also ends after its first segmentation token (fed once, for its hidden state):
            what comes before it, and so its hidden state, are those of the full answer, which is not written.

    Parallel span decoding: while a sequence is inside its span, the forward is fed its next token and W - 1
    guesses of the tokens after it (at first the token repeated, then what the previous forward predicted after
    the rejected guesses, as in Jacobi iteration). A guess is accepted when it equals the greedy prediction after
    the accepted tokens before it, so the output cannot change; each sequence accepts its own number. Cache slots
    of rejected guesses stay allocated but are masked out for that sequence (and reused when no sequence kept
    them), which changes nothing in the attention: masked keys add exact zeros. Sequences past their span (and
    those that are done) sit these W-token forwards out: the forward runs on the other sequences alone (the
    uncompiled step; a compiled one keeps the whole batch, whose shapes it was compiled for), and they go on
    when no sequence is inside a span any more, one token per forward, as they would have.
    """
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    window = max(jacobi, 1)
    rows = torch.arange(batch, device=device)
    # Cache slots, rounded up to a power of two so prompts of other lengths reuse a compiled step. Parallel
    # decoding may leave masked holes; it stops when the slots left could not hold the rest of the answer.
    need = prompt_length + max_new_tokens + 1
    capacity = 1 << (need + (max_new_tokens + window if window > 1 else 0) - 1).bit_length()
    cache = StaticCache(config=vlm.config.get_text_config(), max_cache_len=capacity)
    stepper = _Stepper(vlm, cache, grammar, compile)

    prefill = vlm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        position_ids=_prefill_positions(attention_mask),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    first_logits = prefill.logits[:, -1].float()
    visible = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # the keys each sequence attends to
    visible[:, :prompt_length] = attention_mask.bool()
    cursor = prompt_length  # next free cache slot (shared by the batch)
    next_position = _prefill_positions(attention_mask)[:, -1] + 1  # (B,)
    # + window: spare slots, written by sequences that are done (always with the pad id) and by guesses
    tokens = torch.full((batch, max_new_tokens + window), pad_id, dtype=torch.long, device=device)
    hidden_of_fed: torch.Tensor | None = None  # (B, T, H) last hidden state with generated token t as input
    count = torch.zeros(batch, dtype=torch.long, device=device)  # tokens written per sequence
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # wrote its segmentation token (stop_at_seg)
    state = grammar.initial(batch)
    guesses: torch.Tensor | None = None
    forwards = 0

    def write(chosen: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Append ``chosen`` to the sequences ``where`` is true (pad elsewhere, which changes no state)."""
        nonlocal state, count, ended, stopped
        chosen = torch.where(where, chosen, pad_id)
        tokens.scatter_(1, count[:, None], chosen[:, None])  # a done sequence writes pad after its end
        state = grammar.advance(state, chosen)
        ended = ended | (where & (chosen == end_id))
        if stop_at_seg:
            stopped = stopped | (where & (chosen == seg_id))
        count = count + where.long()
        return chosen

    chosen = write((first_logits + grammar.bias(state, first=True)).argmax(-1), torch.ones_like(ended))
    while True:
        active = ~ended & ~stopped & (count < max_new_tokens)  # sequences that will write more tokens
        # a segmentation token written last (at the budget, or where decoding stops at it) still needs one feed
        # for its hidden state
        fed = active | (~ended & (stopped | (count == max_new_tokens)) & (chosen == seg_id))
        if not bool(fed.any()):
            break
        width, limit = 1, None
        if window > 1:
            # inside a span, the remaining codes and the end marker may be guessed, within the budget
            codes = grammar.inside(state)  # codes written so far inside a span, -1 outside
            limit = torch.minimum(grammar.span_length - codes + 1, max_new_tokens - count).clamp(max=window - 1)
            limit = torch.where(active & (codes >= 0), limit, 0)
            room = cursor + window + int((max_new_tokens - count).max()) <= capacity  # else no slots for holes
            width = window if room and bool(limit.any()) else 1
        group = None  # the sequences of a W-token forward, when not the whole batch
        if width > 1 and not compile:
            waiting = fed & (state == grammar.after)  # past the span: wait for the others' spans
            if bool(waiting.any()) or not bool(fed.all()):
                fed = fed & ~waiting
                group = fed.nonzero()[:, 0]
        if width > 1:
            if guesses is None:
                guesses = chosen[:, None].repeat(1, width - 1)  # first guess: the token repeats
            feed = torch.cat([chosen[:, None], guesses], dim=1)
            positions = next_position[:, None] + torch.arange(width, device=device)
            visible[:, cursor : cursor + width] = fed[:, None]
            mask = visible[:, None, None, :].repeat(1, 1, width, 1)
            mask[:, 0, :, cursor : cursor + width] &= torch.ones(width, width, dtype=torch.bool, device=device).tril()
        else:
            feed, positions, guesses = chosen[:, None], next_position[:, None], None
            visible[:, cursor] = fed
            mask = visible[:, None, None, :]
        hidden = stepper.run(feed, positions, mask) if group is None else stepper.run_rows(group, feed, positions, mask)
        forwards += 1
        if hidden_of_fed is None:
            hidden_of_fed = hidden.new_zeros(batch, max_new_tokens + window, hidden.shape[-1])
        last = count - 1  # the slot of each sequence's newest token; a sequence not fed keeps what it holds
        hidden_of_fed[rows, last] = torch.where(fed[:, None], hidden[:, 0], hidden_of_fed[rows, last])

        if width == 1:
            last_hidden = hidden[:, 0]
            cursor += 1
            next_position = next_position + fed.long()
        else:
            # the grammar states along the fed path, and the greedy token after each fed token
            path = [state]
            for i in range(1, width):
                path.append(grammar.advance(path[-1], feed[:, i]))
            path = torch.stack(path, dim=1)  # (B, W): state after fed tokens 0..i
            # (the guesses that can be accepted lie inside the span; after it, a prediction is only a guess)
            predicted = stepper.greedy(hidden[:, :-1], path[:, :-1], guesses=True)
            # guess i + 1 is right when it is the greedy token after fed token i and the guesses before it were
            # right; end-of-turn and segmentation-token guesses are left to the one-token path
            right = (predicted == feed[:, 1:]) & (feed[:, 1:] != end_id) & (feed[:, 1:] != seg_id)
            accepted = torch.minimum(right.long().cumprod(1).sum(1), limit)  # (B,)
            offsets = torch.arange(1, width, device=device)
            keep = offsets[None] <= accepted[:, None]  # (B, W - 1)
            slots = count[:, None] + offsets[None] - 1
            tokens.scatter_(1, slots, torch.where(keep, feed[:, 1:], tokens.gather(1, slots)))
            new_hidden = torch.where(keep[..., None], hidden[:, 1:], hidden_of_fed[rows[:, None], slots])
            hidden_of_fed[rows[:, None], slots] = new_hidden
            state = path.gather(1, accepted[:, None])[:, 0]
            count = count + accepted
            last_hidden = hidden[rows, accepted]
            kept = int(accepted.max()) + 1
            stepper.rewind(width - kept)
            span_slots = torch.arange(cursor, cursor + width, device=device)
            visible[:, cursor : cursor + width] &= span_slots[None] <= cursor + accepted[:, None]  # rejected: masked
            cursor += kept
            next_position = next_position + fed.long() * (1 + accepted)
            # Jacobi: what was predicted after the first rejected guess on is the next set of guesses
            take = (accepted[:, None] + offsets[None]).clamp(max=width - 2)
            guesses = predicted.gather(1, take)
        active = ~ended & ~stopped & (count < max_new_tokens)
        chosen = torch.where(fed, write(stepper.greedy(last_hidden, state), active & fed), chosen)

    tokens = tokens[:, :max_new_tokens]
    lengths, seg_hidden = [], []
    for b, row in enumerate(tokens.tolist()):
        length = row.index(end_id) if end_id in row else len(row)
        if stopped[b]:
            length = row.index(seg_id) + 1
        lengths.append(length)
        where = [t for t in range(length) if row[t] == seg_id]
        seg_hidden.append(hidden_of_fed[b, where] if where and hidden_of_fed is not None else torch.zeros(0))
    return Decoded(tokens=tokens, lengths=lengths, seg_hidden=seg_hidden, forwards=forwards)


@torch.no_grad()
def reference_decode(
    vlm,  # noqa: ANN001 - InternVLForConditionalGeneration
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    grammar: SpanGrammar,
    *,
    max_new_tokens: int,
    end_id: int,
    pad_id: int,
) -> Decoded:
    """The same decoding through transformers' ``generate`` (dynamic cache, the grammar as a logits processor)."""
    processor = DepthSpanLogitsProcessor(
        grammar.ids,
        grammar.span_length,
        input_ids.shape[1],
        spatial_cot=grammar.spatial_cot,
        require_span=grammar.require_span,
        constrain=grammar.constrain,
    )
    sequences = vlm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        logits_processor=LogitsProcessorList([processor]),
        eos_token_id=end_id,
        pad_token_id=pad_id,
    )
    generated = sequences[:, input_ids.shape[1] :]
    lengths = [row.index(end_id) if end_id in row else len(row) for row in generated.tolist()]
    return Decoded(tokens=generated, lengths=lengths, seg_hidden=None, forwards=generated.shape[1] - 1)


@dataclass(frozen=True)
class Divergence:
    """Where two decodings of one prompt first differ.

    Attributes:
        row: the sequence in the batch.
        position: index of the first differing generated token.
        tokens: (reference token, other token); (-1, -1) when one sequence ends where the other goes on.
        gap: |logit difference| of the two tokens at that position, teacher-forced on the reference's prefix.
        scale: the largest |logit| there.
    """

    row: int
    position: int
    tokens: tuple[int, int]
    gap: float
    scale: float

    def is_tie(self, relative: float = 1e-5) -> bool:
        """A floating-point tie: the two logits are within ``relative`` of the logits' scale. Float32 forwards that
        add in another order (batched, padded, compiled) differ by about 1e-7 to 1e-6 of that scale, so the order
        of operations decides such an argmax; a wrong decoder makes gaps many orders of magnitude larger."""
        return self.gap <= relative * max(1.0, self.scale)


@torch.no_grad()
def divergences(
    vlm,  # noqa: ANN001 - InternVLForConditionalGeneration
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    reference: Decoded,
    other: Decoded,
) -> list[Divergence]:
    """The sequences whose tokens differ between two decodings of the same prompts, with the logit gap at the first
    difference: exact decoders (the loop, parallel span decoding, a compiled step) may differ from ``generate`` only
    at floating-point ties, never at a clear margin."""
    found = []
    for row in range(input_ids.shape[0]):
        ref = reference.tokens[row, : reference.lengths[row] + 1].tolist()
        new = other.tokens[row, : other.lengths[row] + 1].tolist()
        if ref == new[: len(ref)] and len(ref) == len(new):
            continue
        position = next((t for t, (a, b) in enumerate(zip(ref, new, strict=False)) if a != b), min(len(ref), len(new)))
        if position >= min(len(ref), len(new)):
            found.append(Divergence(row, position, (-1, -1), float("inf"), 0.0))  # one stops, the other goes on
            continue
        prefix = torch.tensor(ref[:position], dtype=torch.long, device=input_ids.device)[None]
        sequence = torch.cat([input_ids[row : row + 1], prefix], dim=1)
        mask = torch.cat([attention_mask[row : row + 1], torch.ones_like(prefix)], dim=1)
        logits = (
            vlm(
                input_ids=sequence,
                attention_mask=mask,
                pixel_values=pixel_values[row : row + 1],
                position_ids=_prefill_positions(mask),
            )
            .logits[0, -1]
            .float()
        )
        a, b = ref[position], new[position]
        gap, scale = float((logits[a] - logits[b]).abs()), float(logits.abs().max())
        found.append(Divergence(row, position, (a, b), gap, scale))
    return found
