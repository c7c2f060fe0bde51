"""LoRA-adapted Perceptio models: parameter names under peft's wrapping, and merging adapters back.

Adapters are added by the trainable policy (:func:`perceptio.train.policy.apply_policy`, the one place that
wraps a model with peft, driven by a recipe's ``trainable`` section). Training ends by merging them
(:func:`merge_lora`): the saved model is a plain Perceptio checkpoint that loads without peft and decodes at
full speed. The adapters themselves are not kept apart: the resumable checkpoints hold them while training runs.
"""

from __future__ import annotations

from peft import PeftModel

from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration

__all__ = ["merge_lora", "plain_name"]

_PEFT_PREFIXES = ("base_model.model.",)
_PEFT_INFIXES = (".modules_to_save.default", ".original_module", ".token_adapter", ".base_layer")


def plain_name(name: str) -> str:
    """A parameter name without peft's wrapping (``base_model.model.`` prefix, adapter infixes)."""
    for prefix in _PEFT_PREFIXES:
        name = name.removeprefix(prefix)
    for infix in _PEFT_INFIXES:
        name = name.replace(infix, "")
    return name


def merge_lora(wrapped: PeftModel) -> PerceptioForConditionalGeneration:
    """Fold the adapters into the weights and return a plain model (save it with ``save_pretrained``)."""
    merged = wrapped.merge_and_unload()
    merged.freeze_frozen_parts()
    return merged
