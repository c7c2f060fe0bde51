"""LoRA fine-tuning of Perceptio with peft, and merging adapters back into a plain checkpoint.

The language model gets LoRA adapters; the rows of the perception tokens in the (new) embeddings train fully
(``trainable_token_indices``); the segmentation-token projection and the SAM2 mask decoder train fully
(``modules_to_save``), except the mask-decoder parts the model keeps frozen. Adapters are saved as safetensors
by peft's ``save_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model

from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration

__all__ = ["LoraSettings", "apply_lora", "merge_lora", "plain_name"]

_PEFT_PREFIXES = ("base_model.model.",)
_PEFT_INFIXES = (".modules_to_save.default", ".original_module", ".token_adapter", ".base_layer")


@dataclass(frozen=True)
class LoraSettings:
    """Which parts get adapters and how big they are."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA path."""
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    """Regex of the linear layers that get adapters (the language model's attention and MLP by default)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r >= 1, alpha >= 1 and 0 <= dropout < 1, got {self}")


def plain_name(name: str) -> str:
    """A parameter name without peft's wrapping (``base_model.model.`` prefix, adapter infixes)."""
    for prefix in _PEFT_PREFIXES:
        name = name.removeprefix(prefix)
    for infix in _PEFT_INFIXES:
        name = name.replace(infix, "")
    return name


def apply_lora(model: PerceptioForConditionalGeneration, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap ``model`` for LoRA training (the model must have its text tokenizer registered)."""
    settings = settings or LoraSettings()
    ids = model.config.resolved_token_ids
    frozen = {name for name, module in model.named_modules() if any(module is m for m in model.frozen_modules())}
    new_tokens = [ids.seg, ids.depth_start, ids.depth_end, *ids.code_ids]
    rows = {"embed_tokens": new_tokens}
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        rows["lm_head"] = new_tokens  # an untied LM head needs its own trainable rows for the new tokens
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        trainable_token_indices=rows,
        modules_to_save=["seg_projection", "mask_decoder"],
    )
    wrapped = get_peft_model(model, config)
    for name, param in wrapped.named_parameters():  # peft's trainable copies must not revive frozen parts
        plain = plain_name(name)
        if any(plain == f or plain.startswith(f + ".") for f in frozen):
            param.requires_grad_(False)
    return wrapped


def merge_lora(wrapped: PeftModel) -> PerceptioForConditionalGeneration:
    """Fold the adapters into the weights and return a plain model (save it with ``save_pretrained``)."""
    merged = wrapped.merge_and_unload()
    merged.freeze_frozen_parts()
    return merged
