"""The trainable policy: which parameters are frozen, trained fully, or adapted with LoRA.

Rules are glob patterns over parameter names (as ``model.named_parameters()`` spells them on the plain model),
applied in order, the last match winning. ``lora`` on a parameter of a linear layer whose leaf name matches
``lora.layers`` gives that layer an adapter (its own weights stay frozen); other ``lora`` parameters (norms,
embeddings) are frozen. The model's always-frozen parts stay frozen whatever the rules say.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from dataclasses import dataclass

from peft import LoraConfig, get_peft_model
from torch import nn

from perceptio.models.lora import plain_name
from perceptio.models.modeling_perceptio import PerceptioForConditionalGeneration
from perceptio.train.config import TrainableConfig

__all__ = ["TrainablePlan", "apply_policy", "plan_policy", "plain_name"]


@dataclass
class TrainablePlan:
    """Each parameter's mode (``frozen``, ``full``, ``lora``, ``fixed`` for the model's always-frozen parts), the
    linear layers that get LoRA adapters, and the embedding rows that train on their own."""

    modes: dict[str, str]
    lora_layers: list[str]
    token_rows: dict[str, list[int]]
    sizes: dict[str, int]

    def table(self, model: nn.Module) -> str:
        """A text table: module group | mode(s) | parameters | trainable (after :func:`apply_policy`)."""
        trainable: dict[str, int] = defaultdict(int)
        for name, param in model.named_parameters():  # adapters count in their layer's group
            if param.requires_grad:
                trainable[_group(plain_name(name))] += param.numel()
        sizes = self.sizes
        groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for name, mode in self.modes.items():
            groups[_group(name)][mode] += sizes.get(name, 0)
        rows = [("module", "mode", "parameters", "trainable")]
        total = trained = 0
        for group in sorted(groups):
            modes = groups[group]
            label = "/".join(sorted(modes)) if len(modes) > 1 else next(iter(modes))
            if group in {_group(n) for n in self.lora_layers}:
                label += " (+LoRA)" if "lora" not in label else ""
            count = sum(modes.values())
            total += count
            trained += trainable.get(group, 0)
            rows.append((group, label, f"{count:,}", f"{trainable.get(group, 0):,}"))
        rows.append(("total", "", f"{total:,}", f"{trained:,} ({100 * trained / max(total, 1):.1f}%)"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _group(name: str) -> str:
    parts = name.split(".")
    depth = 3 if name.startswith("vlm.model.") else 2
    return ".".join(parts[: min(depth, len(parts) - 1)]) or name


def plan_policy(model: PerceptioForConditionalGeneration, config: TrainableConfig) -> TrainablePlan:
    """Decide every parameter's mode (nothing is changed yet)."""
    fixed = {id(p) for p in model.frozen_parameters()}
    patterns = list(config.rules.items())
    modes: dict[str, str] = {}
    matched = dict.fromkeys(config.rules, False)
    for name, param in model.named_parameters():
        mode = config.default
        for pattern, rule in patterns:
            if fnmatch.fnmatchcase(name, pattern):
                mode = rule
                matched[pattern] = True
        modes[name] = "fixed" if id(param) in fixed else mode
    unused = [p for p, hit in matched.items() if not hit]
    if unused:
        examples = ", ".join(sorted({_group(n) + ".*" for n in modes})[:8])
        raise ValueError(f"trainable.rules: {unused} match no parameter; parameter groups look like {examples}")
    layer_re = re.compile(config.lora.layers)
    lora_layers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and layer_re.fullmatch(name.rsplit(".", 1)[-1])
        and modes.get(f"{name}.weight") == "lora"
    ]
    if "lora" in modes.values() and not lora_layers:
        raise ValueError(
            f"trainable: parameters are marked lora, but no linear layer among them matches lora.layers "
            f"{config.lora.layers!r}"
        )
    token_rows: dict[str, list[int]] = {}
    embeddings = model.get_input_embeddings().weight
    embedding_name = next(n for n, p in model.named_parameters() if p is embeddings)
    if config.new_token_rows and modes[embedding_name] != "full":
        if not lora_layers:
            raise ValueError(
                "trainable.new_token_rows trains only the perception tokens' rows, which needs LoRA elsewhere in the "
                f"model (peft's trainable tokens); either mark {embedding_name} full, add a lora rule, or set "
                "trainable.new_token_rows=false"
            )
        ids = model.config.resolved_token_ids
        rows = [ids.seg, ids.depth_start, ids.depth_end, *ids.code_ids]
        token_rows["embed_tokens"] = rows
        if model.get_output_embeddings().weight is not embeddings:
            token_rows["lm_head"] = rows  # an untied LM head needs its own rows
    sizes = {name: param.numel() for name, param in model.named_parameters()}
    return TrainablePlan(modes=modes, lora_layers=lora_layers, token_rows=token_rows, sizes=sizes)


def apply_policy(model: PerceptioForConditionalGeneration, config: TrainableConfig) -> tuple[nn.Module, TrainablePlan]:
    """Freeze, unfreeze and wrap ``model`` as the policy says.

    Returns:
        The model to train (a ``PeftModel`` when any layer gets LoRA, else ``model`` itself) and the plan.
    """
    plan = plan_policy(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(plan.modes[name] == "full")
    if not plan.lora_layers:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the trainable policy freezes every parameter; mark something full or lora")
        return model, plan
    lora = config.lora
    wrapped = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=plan.lora_layers,
            trainable_token_indices=plan.token_rows or None,
        ),
    )
    for name, param in wrapped.named_parameters():  # peft froze the base model: revive the full parameters
        plain = plain_name(name)
        if plan.modes.get(plain) == "full":
            param.requires_grad_(True)
        elif plan.modes.get(plain) == "fixed":
            param.requires_grad_(False)
    return wrapped, plan
