"""The model-free evaluation layer: benchmark metrics as mergeable accumulators and answer-letter extraction.

Metrics follow the published protocols (cIoU/gIoU as LISA and Sa2VA, BLINK/HardBLINK accuracy per point count,
MMBench CircularEval and vanilla accuracy); letter extraction is deterministic (no language-model judge).
Nothing here loads a model.
"""

from perceptio.eval.extract import (
    LetterAnswer,
    extract_letter,
    normalize_answer,
    parse_answer,
    strip_perception_tokens,
    vlmevalkit_letter,
)
from perceptio.eval.metrics import (
    CIOU_EPS,
    GIOU_EPS,
    HARDBLINK_POINT_COUNTS,
    MaskScore,
    MMBenchRecord,
    RelativeDepthMeter,
    SegmentationMeter,
    score_mmbench,
)

__all__ = [
    "CIOU_EPS",
    "GIOU_EPS",
    "HARDBLINK_POINT_COUNTS",
    "LetterAnswer",
    "MMBenchRecord",
    "MaskScore",
    "RelativeDepthMeter",
    "SegmentationMeter",
    "extract_letter",
    "normalize_answer",
    "parse_answer",
    "score_mmbench",
    "strip_perception_tokens",
    "vlmevalkit_letter",
]
