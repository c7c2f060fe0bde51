"""Deterministic answer-letter extraction for letter multiple-choice answers (the same rules for every
model, so accuracies compare).

Two extractors, both without any language-model judge:

* :func:`extract_letter` (with :func:`parse_answer` for the details): our rule for BLINK, HardBLINK and MMBench.
  The **last explicit label** in the answer wins; see :func:`parse_answer` for the rule list.
* :func:`vlmevalkit_letter`: VLMEvalKit's exact-matching path (``can_infer_option`` then ``can_infer_text``), with
  a flag for its recent and older versions, for MMBench numbers comparable with VLMEvalKit tables.

Both first remove the perception tokens with :func:`strip_perception_tokens`, so that nothing inside a depth span
(codes, markers), a segmentation token or a ``<p>...</p>`` grounding phrase is read as an answer. The token
strings come from :mod:`perceptio.vocab`; this module never spells them.

A label is always a capital letter: ``a``/``b`` are never read as options. An extracted label outside the item's
letters (``D`` for a 3-point HardBLINK item) is not an answer: :func:`extract_letter` returns None for it, so the
caller scores it wrong exactly like an unparsable answer, and :func:`parse_answer` keeps it in ``label`` for the
per-sample result file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from perceptio.vocab import DEPTH_END_TOKEN, DEPTH_START_TOKEN, SEG_TOKEN, depth_code_token

__all__ = ["LetterAnswer", "extract_letter", "parse_answer", "strip_perception_tokens", "vlmevalkit_letter"]

# ---------------------------------------------------------------------------------------- token stripping

# Every depth token (markers and codes) shares one prefix; a token is that prefix up to the next ">", which also
# catches malformed codes that a model may emit.
_DEPTH_PREFIX = os.path.commonprefix([DEPTH_START_TOKEN, DEPTH_END_TOKEN, depth_code_token(0)])
if len(_DEPTH_PREFIX) < 2:  # pragma: no cover - guards a vocabulary change
    raise RuntimeError("the depth tokens no longer share a prefix; update perceptio.eval.extract's stripping patterns")
_STRIP_RES = (
    # a whole closed depth span, whatever it holds
    re.compile(re.escape(DEPTH_START_TOKEN) + r".*?" + re.escape(DEPTH_END_TOKEN), re.DOTALL),
    # any depth token left over (an unclosed span, a stray code or marker)
    re.compile(re.escape(_DEPTH_PREFIX) + r"[^<>\s]*>"),
    re.compile(re.escape(SEG_TOKEN)),
    # InternVL / Sa2VA grounding phrases: the phrase is a referring expression, not an answer
    re.compile(r"<p>.*?</p>", re.DOTALL),
    re.compile(r"</?p>"),
)


def normalize_answer(text: str) -> str:
    """Short-answer matching (VQA): lower case, punctuation and the articles a/an/the removed, spaces collapsed."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def strip_perception_tokens(text: str) -> str:
    """``text`` with depth spans, stray depth tokens, segmentation tokens and ``<p>...</p>`` phrases each replaced
    by one space (so that the text on either side never fuses into one word).

    A closed depth span is removed whole, text inside it included. An unclosed span (a generation cut short)
    loses its tokens but keeps any text after them, where the answer usually is.
    """
    for pattern in _STRIP_RES:
        text = pattern.sub(" ", text)
    return text


# ------------------------------------------------------------------------------------------- our extractor

# A capital letter standing alone: not part of a word ("Point"), a contraction ("I'm") or a compound ("X-ray").
_L = r"(?<![\w'’\-])(?P<L>[A-Z])(?![\w'’\-])"
_OPEN = r"[ \t*_#>\-(\[{\"'`]*"  # decoration before a label at the start of a line
_CLOSE = r"[ \t\r*_)\]}\"'`.:,;!]*"  # decoration after it
_CLOSER = r"(?i:closer|closest|nearer|nearest)"
_PICK = r"[*_(\[\"'`]*"  # decoration between an answer phrase and its letter

# Explicit labels: a letter in an answer-like position (see parse_answer). `guard` marks the rules where a
# capital "A" may be the English article ("Answer: A point is closer") and is checked for it.
_EXPLICIT: tuple[tuple[re.Pattern[str], bool], ...] = (
    # a line that is only a (decorated) letter: "A", "(A)", "A.", "A)", "**A**"
    (re.compile(rf"(?m)^{_OPEN}{_L}{_CLOSE}$"), False),
    # a line that starts with a letter closed by "." or ")": "B. Because ...", "(B) B is closer"
    (re.compile(rf"(?m)^{_OPEN}{_L}[.)](?=\s|$)"), False),
    # a bracketed or bold letter anywhere: "... is (C).", "**C**"
    (re.compile(rf"[(\[]\s*{_L}\s*[)\]]"), False),
    (re.compile(rf"\*\*\s*\(?{_L}\)?\.?\s*\*\*"), False),
    # an answer phrase: "Answer: A", "The answer is (C)", "the answer is that point D", "Option B"
    (
        re.compile(
            r"\b(?i:answer|option|choice)\b(?:\s+(?i:is|would\s+be|should\s+be|must\s+be|will\s+be))?\s*[:=\-–]?\s*"
            rf"(?:(?i:that)\s+)?(?:(?i:point|option|choice|letter)\s+)?{_PICK}{_L}"
        ),
        True,
    ),
    # a closeness claim: "Point B is closer", "B is the closest", "point C appears to be nearer"
    (
        re.compile(
            rf"(?:\b(?i:point|marker|label)\s+)?[(\[]?{_L}[)\]]?\s+(?i:is|appears|seems|looks)"
            rf"(?:\s+(?i:to\s+be))?\s+(?:(?i:the)\s+)?(?:(?i:one)\s+)?{_CLOSER}\b"
        ),
        False,
    ),
    # "The closest point is C", "the point nearest to the camera is point B"
    (
        re.compile(
            rf"\b{_CLOSER}(?:\s+(?i:point|one|option|marker|object))?(?:\s+(?i:to\s+the\s+(?:camera|viewer)))?"
            rf"\s+(?i:is|would\s+be)\s+(?:(?i:point|option|marker)\s+)?{_PICK}{_L}"
        ),
        True,
    ),
)
_ANY_LETTER = re.compile(_L)
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
# Words that may follow a letter used as a label ("A is closer", "B because ..."); any other lowercase word after
# "A" (or "I") makes it the article (or the pronoun).
_CONTINUATIONS = frozenset(
    {"is", "was", "seems", "appears", "looks", "has", "because", "since", "as", "and", "or", "which", "would"}
    | {"should", "must", "will", "than"}
)

Rule = Literal["explicit", "unique_letter", "option_text", "none"]


@dataclass(frozen=True)
class LetterAnswer:
    """What :func:`parse_answer` found.

    Attributes:
        letter: the answer to score: a letter of the item (``A`` .. the ``num_options``-th), or None when the text
            names none or names one outside the item's range. None is scored wrong.
        label: the label the text names, before the range check (an out-of-range ``D`` is kept here).
        rule: which rule decided: ``"explicit"``, ``"unique_letter"``, ``"option_text"`` or ``"none"``.
    """

    letter: str | None
    label: str | None
    rule: Rule

    @property
    def out_of_range(self) -> bool:
        """The text names a label that is not one of the item's letters (counted wrong)."""
        return self.label is not None and self.letter is None


def _letters(num_options: int) -> tuple[str, ...]:
    if isinstance(num_options, bool) or not isinstance(num_options, int) or not 1 <= num_options <= 26:
        raise ValueError(f"num_options must be an integer from 1 to 26 (options A..Z), got {num_options!r}")
    return tuple(chr(ord("A") + i) for i in range(num_options))


def _article_like(text: str, match: re.Match[str]) -> bool:
    """An "A" (or "I") followed by a lowercase word that does not continue a label: the article (pronoun)."""
    if match.group("L") not in ("A", "I"):
        return False
    word = _NEXT_WORD.match(text, match.end("L"))
    return word is not None and word.group(1) not in _CONTINUATIONS


def _option_text(text: str, choices: Sequence[str], letters: Sequence[str], *, length_guard: bool = True) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the single option whose text occurs in the answer (``length_guard``: only
    in answers at most twice as long as all option texts together, as its recent version)."""
    lower = text.lower()
    if length_guard and len(lower) > 2 * sum(len(str(c)) for c in choices):
        return None
    found = [letter for letter, choice in zip(letters, choices, strict=True) if str(choice).lower() in lower]
    return found[0] if len(found) == 1 else None


def parse_answer(text: str, num_options: int, *, choices: Sequence[str] | None = None) -> LetterAnswer:
    """Find the option letter an answer names, and how.

    Rules, in order:

    1. Perception tokens are removed (:func:`strip_perception_tokens`).
    2. **Explicit labels**: a capital letter in an answer-like position:

       * a line that is only the letter, decorated or not: ``A``, ``(A)``, ``A.``, ``A)``, ``**A**``;
       * a line that starts with the letter closed by ``.`` or ``)``: ``B. Because ...``, ``(B) B is closer``;
       * a bracketed or bold letter anywhere: ``The answer is (C).``, ``... so **C**``;
       * after *answer*, *option* or *choice*: ``Answer: A``, ``the answer is that point D is closer``;
       * a closeness claim: ``Point B is closer``, ``C is the closest``, ``point C appears to be nearer``;
       * ``The closest point is C``, ``the point nearest to the camera is point B``.

       When there are several, the **last** one in the text wins: a chain of thought that names points along
       the way is decided by its conclusion, and an explanation after a leading label (``B. Because point B
       ...``) keeps it unless it states another label. In the answer-phrase rules an ``A`` followed by a
       lowercase word other than a continuation (*is*, *because*, *and*, ...) is the English article, not a label
       (``Answer: A point is closer`` names nothing).
    3. Otherwise, **unique letter**: if exactly one of the item's letters occurs as a standalone capital (not
       inside a word: never the ``P`` of ``Point``; ``A``/``I`` before a lowercase word read as the article or the
       pronoun), that letter. Two different letters are ambiguous and give nothing.
    4. Otherwise, when ``choices`` are given (MMBench), **option text**: VLMEvalKit's ``can_infer_text``, the one
       option whose text occurs (case-insensitively) in an answer at most twice as long as all options together.
    5. Otherwise nothing: ``letter`` is None and the answer is scored wrong.

    A label from rule 2 may be any capital letter; one beyond the item's letters gives ``letter=None`` (scored
    wrong) with the label kept. Rule 3 only considers the item's letters.

    Args:
        text: the model's raw answer.
        num_options: how many options (or markers) the item has: letters ``A`` .. the ``num_options``-th.
        choices: the option texts in letter order, to enable rule 4.
    """
    letters = _letters(num_options)
    if choices is not None and len(choices) != num_options:
        raise ValueError(f"got {len(choices)} choices for num_options={num_options}; pass one text per option")
    clean = strip_perception_tokens(text)

    last: tuple[int, str] | None = None
    for pattern, guard in _EXPLICIT:
        for match in pattern.finditer(clean):
            if guard and _article_like(clean, match):
                continue
            position = match.start("L")
            if last is None or position > last[0]:
                last = (position, match.group("L"))
    if last is not None:
        label = last[1]
        return LetterAnswer(letter=label if label in letters else None, label=label, rule="explicit")

    found = {
        m.group("L") for m in _ANY_LETTER.finditer(clean) if m.group("L") in letters and not _article_like(clean, m)
    }
    if len(found) == 1:
        (letter,) = found
        return LetterAnswer(letter=letter, label=letter, rule="unique_letter")

    if choices is not None:
        letter = _option_text(clean, choices, letters)
        if letter is not None:
            return LetterAnswer(letter=letter, label=letter, rule="option_text")
    return LetterAnswer(letter=None, label=None, rule="none")


def extract_letter(text: str, num_options: int, *, choices: Sequence[str] | None = None) -> str | None:
    """The option letter ``text`` answers (``"A"`` .. the ``num_options``-th), or None, which scores wrong.

    None covers both an answer that names no option and one that names a letter outside the item's range.
    The rules are those of :func:`parse_answer`; ``choices`` enables its option-text fallback.
    """
    return parse_answer(text, num_options, choices=choices).letter


# ----------------------------------------------------------------------------------- VLMEvalKit's matching

_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_PUNCTUATION = ".()[],:;!*#{}"
_VERBOSE_ANSWER = re.compile(r"(?i:(?:correct\s+)?answer\s+is)\s+\**(?<![\w])([A-Z])(?!\w)\**")


def vlmevalkit_letter(text: str, choices: Sequence[str], *, recent: bool = True) -> str | None:
    """VLMEvalKit's deterministic MMBench matching (``can_infer``) without its LLM judge.

    1. A known refusal phrase gives ``"Z"`` (a wrong answer that is not "unparsed").
    2. ``can_infer_option``: the characters ``.()[],:;!*#{}`` become spaces and the answer is split on
       whitespace; if exactly one option letter is a token, it is the answer (``recent``: only if its first
       occurrence is among the last four tokens, VLMEvalKit's ``index > len - 5``); if none is but ``Z`` is,
       ``"Z"``. ``recent`` also accepts "(correct) answer is X".
    3. ``can_infer_text``: the one option whose text occurs (case-insensitively) in the answer; ``recent`` skips
       this for answers longer than twice the options' total length.
    4. Otherwise None: under exact matching an unresolved answer is wrong.

    Perception tokens are stripped first (:func:`strip_perception_tokens`). One deliberate deviation: the
    "answer is X" pattern needs a standalone capital letter, where VLMEvalKit's case-insensitive ``[ABCD]``
    also reads "the answer is blue" as B.

    Args:
        text: the model's raw answer.
        choices: the option texts in letter order (A, B, ...).
        recent: the current VLMEvalKit rules (True) or the older ones vendored in Sa2VA (False).
    """
    letters = _letters(len(choices))
    answer = strip_perception_tokens(str(text))
    if any(phrase in answer for phrase in _REFUSALS):
        return "Z"
    spaced = answer
    for char in _PUNCTUATION:
        spaced = spaced.replace(char, " ")
    tokens = spaced.split()
    found = [letter for letter in letters if letter in tokens]
    if len(found) == 1:
        if not recent or tokens.index(found[0]) > len(tokens) - 5:
            return found[0]
    elif not found and "Z" in tokens:
        return "Z"
    if recent:
        match = _VERBOSE_ANSWER.search(answer)
        if match and match.group(1) in letters:
            return match.group(1)
    return _option_text(answer, choices, letters, length_guard=recent)
