"""The language model's attention: transformers' SDPA, with grouped-query attention left to the kernel on a CPU.

With a mask and more than one query, transformers' SDPA path copies every key/value head once per query head that
shares it (``repeat_kv``) before calling the kernel, because on a GPU the kernel would otherwise fall back to its
slowest path. A CPU's kernel groups the heads itself (``enable_gqa``) at no cost, and the copy is not small: the
decode loop's static KV cache holds the whole answer's slots, so for SmolLM2 at a batch of 8 the copies were a
fifth of a 16-token forward and a quarter of the prefill. The outputs are the same to the bit (the kernel reads
the same key/value head for each query head); gradients differ only by the order of their sums.

:func:`use_grouped_sdpa` switches a model's language model to it (``PerceptioForConditionalGeneration`` does, when
its language model uses ``sdpa``); every other case (a GPU, no mask, one query, no grouped heads) runs transformers'
own SDPA function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["GROUPED_SDPA", "grouped_sdpa_forward", "use_grouped_sdpa"]

GROUPED_SDPA = "perceptio_sdpa"


def grouped_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,  # noqa: ANN003 - what transformers' attention modules pass on
) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention function, except that on a CPU, with a mask and more than one query, grouped
    key/value heads go to the kernel as they are (``enable_gqa``) instead of being copied per query head."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (
        grouped
        and query.device.type == "cpu"
        and attention_mask is not None
        and query.shape[2] > 1
        and kwargs.get("position_bias") is None
        and key.shape[-1] == value.shape[-1]
    ):
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return output.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the same masks as ``sdpa``


def use_grouped_sdpa(language_model_config) -> bool:  # noqa: ANN001 - a transformers PretrainedConfig
    """Switch a language model's config from ``sdpa`` to :data:`GROUPED_SDPA` (read at every forward; not saved with
    the config). Any other attention (eager, flash attention) is left alone. Returns whether it switched."""
    if language_model_config._attn_implementation != "sdpa":
        return False
    language_model_config._attn_implementation = GROUPED_SDPA
    return True
