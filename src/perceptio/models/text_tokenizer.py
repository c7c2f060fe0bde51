"""The text tokenizer of the `tiny` preset, built offline, and InternVL's image-token names.

Real presets load the text tokenizer saved with their InternVL checkpoint. The `tiny` preset cannot download
one, so it trains a small byte-level BPE in code on a fixed corpus: the prompts' sentences filled with the
object words the caller gives (the tiny preset gives the synthetic world's sizes, colours and shapes).
Deterministic, a few hundred milliseconds, and every string stays encodable because the alphabet is all bytes.
The perception tokens are added by :func:`perceptio.vocab.register_tokens`, exactly as for real checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TOKENS", "IMAGE_TOKENS", "build_tiny_text_tokenizer"]

#: InternVL's image tokens, by the attribute names transformers' InternVL processor looks up.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
#: The Qwen2/InternVL chat markers and the padding token.
CHAT_TOKENS = {"pad": "<|endoftext|>", "turn_start": "<|im_start|>", "turn_end": "<|im_end|>"}

_SENTENCES = [
    "Please segment {obj} in this image.",
    "What is the depth map for the image?",
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?",
    "What color is {obj}? What shape is {obj}? How many {noun}s are there?",
    "Is {obj} to the left or to the right of {obj}? left right",
    "{obj} closest to the camera. {obj} farthest from the camera.",
    "Sure, it is segmented. The answer is (A) (B) (C) (D) (E). A. B. C. D. E.",
    "Hint: Question: Options: Answer with the option's letter from the given choices directly.",
    "user assistant system You are a helpful assistant. 0 1 2 3 4 5 6 7 8 9 10",
]


def _corpus(sizes: Sequence[str], colors: Sequence[str], shapes: Sequence[str]) -> list[str]:
    lines = []
    for size in sizes:
        for color in colors:
            for shape in shapes:
                obj = f"the {size} {color} {shape}"
                lines += [s.format(obj=obj, noun=shape) for s in _SENTENCES]
                # short answers open the assistant turn without a leading space: one token each, as in real
                # tokenizers' vocabularies, instead of a spelling in fragments ("b", "lu", "e")
                lines += [color, shape, size, f"{shape}s", "left", "right", "yes", "no"]
                lines.append(f"the {size} object, the {color} object, the {size} {color} object; {color} objects")
    return lines


def build_tiny_text_tokenizer(
    sizes: Sequence[str], colors: Sequence[str], shapes: Sequence[str], vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with InternVL's image tokens and the Qwen2 chat markers (no perception tokens),
    trained on the prompts' sentences about every (size, colour, shape) object."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = [CHAT_TOKENS["pad"], CHAT_TOKENS["turn_start"], CHAT_TOKENS["turn_end"], *IMAGE_TOKENS.values()]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(sizes, colors, shapes), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=CHAT_TOKENS["turn_end"],
        pad_token=CHAT_TOKENS["pad"],
        padding_side="left",
        extra_special_tokens=IMAGE_TOKENS,
    )
