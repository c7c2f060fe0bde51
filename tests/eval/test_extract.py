"""Letter extraction: the issue's table, perception-token stripping, range rules,
the option-text fallback and VLMEvalKit's exact-matching path."""

from __future__ import annotations

import numpy as np
import pytest

from perceptio.eval import LetterAnswer, extract_letter, parse_answer, strip_perception_tokens, vlmevalkit_letter
from perceptio.vocab import PerceptionVocab

VOCAB = PerceptionVocab(num_depth_codes=16, depth_grid=(2, 3))
SPAN = VOCAB.render_depth_span(np.array([[0, 5, 15], [3, 3, 9]]))
SEG = VOCAB.seg_token

AURORA_COT = (
    "Point A is located at (x = 120, y = 160), point B is located at (x = 40, y = 170), point C is located at "
    f"(x = 300, y = 150), point D is located at (x = 200, y = 180). The depth map for the image is {SPAN}. "
    "Since point D has a higher pixel value on the depth map, the answer is that point D is closer to the camera."
)

# (answer text, number of options, expected letter): the table of the issue
TABLE = [
    ("A", 4, "A"),
    ("(A)", 4, "A"),
    ("A.", 4, "A"),
    ("A)", 4, "A"),
    ("**A**", 4, "A"),
    ("Answer: A", 4, "A"),
    ("The answer is (C).", 4, "C"),
    ("Point B is closer", 2, "B"),
    ("Point B is closer to the camera.", 5, "B"),
    (AURORA_COT, 4, "D"),
    # a chain of thought after the label keeps it; one before it is decided by its conclusion
    ("B. Because point B lies on the table, which is nearer than the wall.", 3, "B"),
    ("(B) B is closer", 2, "B"),
    ("Point A is on the far wall. Point C sits on the table in front. So the answer is C.", 3, "C"),
    ("C is the closest one.", 3, "C"),
    ("The closest point is C.", 4, "C"),
    ("The point nearest to the camera is point B.", 3, "B"),
    ("I think the answer is B because it is on the floor.", 3, "B"),
    ("The answer is A because it is on the table.", 3, "A"),
    ("Between the two, B seems nearer to me.", 2, "B"),
    # the English article is not an answer, nor is the P of "Point"
    ("A point is closer to the camera.", 3, None),
    ("Answer: A point on the table is closer.", 3, None),
    ("A point is closer to the camera than B.", 3, "B"),
    ("Point", 26, None),
    # several letters without an explicit label are ambiguous
    ("A or B, hard to say.", 2, None),
    ("blue", 3, None),
    ("", 3, None),
]


@pytest.mark.parametrize(("text", "num_options", "expected"), TABLE)
def test_extraction_table(text: str, num_options: int, expected: str | None) -> None:
    assert extract_letter(text, num_options) == expected


def test_rule_names() -> None:
    assert parse_answer("(C)", 3) == LetterAnswer(letter="C", label="C", rule="explicit")
    assert parse_answer("the marker labelled B sits on the table", 3) == LetterAnswer("B", "B", "unique_letter")
    assert parse_answer("A point is closer", 3) == LetterAnswer(None, None, "none")


@pytest.mark.parametrize("text", ["D", "(D)", "Point D is closer.", "The answer is D."])
def test_letter_beyond_the_range_is_kept_as_label_but_scored_wrong(text: str) -> None:
    answer = parse_answer(text, 3)  # a 3-point HardBLINK item: A..C
    assert answer.label == "D" and answer.letter is None and answer.out_of_range
    assert extract_letter(text, 3) is None
    assert extract_letter(text, 4) == "D"


def test_final_explicit_label_wins_even_when_out_of_range() -> None:
    assert parse_answer("(A) A is closer. Actually, point E is the closest.", 3).label == "E"
    assert extract_letter("(A) A is closer. Actually, point E is the closest.", 3) is None


def test_out_of_range_letters_do_not_count_as_unique_letters() -> None:
    # "I" and "E" are not options of a 2-point item, so B is the only candidate
    assert parse_answer("Honestly I would go with B here", 2) == LetterAnswer("B", "B", "unique_letter")
    assert extract_letter("E seems far, and so does F", 2) is None


def test_letters_inside_depth_spans_and_phrases_are_ignored() -> None:
    stray = VOCAB.depth_start_token + VOCAB.code_tokens[1] + " (C) " + VOCAB.code_tokens[2] + VOCAB.depth_end_token
    assert extract_letter(f"The answer is B. {stray}", 3) == "B"  # unstripped, the later (C) would win
    assert extract_letter(f"B {stray}", 3) == "B"  # unstripped, B and C would be ambiguous
    assert extract_letter(f"Sure, <p>A dog</p> {SEG}.", 2) is None
    assert extract_letter(f"It is {SEG}. (B)", 2) == "B"
    assert extract_letter(f"{SPAN}B", 2) == "B"  # the letter does not fuse with the span


def test_strip_perception_tokens() -> None:
    unclosed = VOCAB.depth_start_token + "".join(VOCAB.code_tokens[:3])
    assert strip_perception_tokens(f"x{SPAN}y").split() == ["x", "y"]
    assert strip_perception_tokens(f"{unclosed} so (B)").split() == ["so", "(B)"]
    assert strip_perception_tokens(f"a {SEG} b <p>the cat</p> c").split() == ["a", "b", "c"]
    malformed = VOCAB.depth_start_token.replace("START", "Q")  # a depth-family token the vocabulary lacks
    assert strip_perception_tokens(f"{malformed}(A)").strip() == "(A)"
    for token in VOCAB.tokens:
        assert token not in strip_perception_tokens(f"{AURORA_COT} {token}")


def test_option_text_fallback_only_with_choices() -> None:
    choices = ["red", "green", "blue"]
    assert extract_letter("It is blue.", 3) is None
    assert parse_answer("It is blue.", 3, choices=choices) == LetterAnswer("C", "C", "option_text")
    assert extract_letter("red or blue", 3, choices=choices) is None  # two options named
    long = "The colour of the car in the picture is clearly blue, as anyone can see."
    assert extract_letter(long, 3, choices=choices) is None  # longer than twice the options: skipped
    assert extract_letter("(A) blue", 3, choices=choices) == "A"  # a letter beats option text


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_options must be an integer from 1 to 26"):
        extract_letter("A", 0)
    with pytest.raises(ValueError, match="2 choices for num_options=3"):
        extract_letter("A", 3, choices=["x", "y"])


CHOICES = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize(
    ("text", "recent", "expected"),
    [
        ("A", True, "A"),
        ("(B)", True, "B"),
        ("The answer is C.", True, "C"),
        # the single letter is far from the end: recent rejects it, then reads "answer is X"
        ("The answer is B, since the animal in the picture has feathers and wings.", True, "B"),
        ("B is right because the animal in the picture has feathers and wings.", True, None),
        ("B is right because the animal in the picture has feathers and wings.", False, "B"),
        # VLMEvalKit reads the article in the old version, not in the recent one
        ("A point is closer to the camera", False, "A"),
        ("A point is closer to the camera", True, None),
        ("A or B", True, None),
        ("It is a dog.", True, "B"),
        ("Cannot determine the answer", True, "Z"),
        ("Z", True, "Z"),
        ("the answer is blue", True, None),  # VLMEvalKit's case-insensitive regex would say B
        (f"{SPAN} D", True, "D"),
    ],
)
def test_vlmevalkit_letter(text: str, recent: bool, expected: str | None) -> None:
    assert vlmevalkit_letter(text, CHOICES, recent=recent) == expected
