"""The depth tokenizer: a VQ-VAE whose code indices are Perceptio's depth tokens.

Public face:

* :meth:`DepthTokenizer.encode` depth (B, H, W) in [0, 1] -> codes (B, h, w);
* :meth:`DepthTokenizer.decode` codes -> depth (B, H, W) in [0, 1];
* :meth:`DepthTokenizer.decode_soft` probabilities or logits over the K codes -> depth, differentiable in the
  probabilities (the soft-merging path of the model's reconstruction loss);
* :meth:`DepthTokenizer.codes_to_text` / :meth:`DepthTokenizer.text_to_codes` through :mod:`perceptio.vocab`;
* :meth:`DepthTokenizer.save_pretrained` / :meth:`DepthTokenizer.from_pretrained` (safetensors + config.json).

Depth maps are in the convention of :mod:`perceptio.tokenizers.depth.normalize` (relative inverse depth,
[0, 1], 1 = nearest) at ``config.input_size``; :meth:`DepthTokenizer.prepare` gets raw maps there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from perceptio.errors import UserError
from perceptio.tokenizers.depth.config import DepthTokenizerConfig
from perceptio.tokenizers.depth.normalize import DepthInputError, Quantity, normalize_depth, resize_nearest
from perceptio.tokenizers.depth.quantizer import EMAQuantizer
from perceptio.utils.weights_files import check_safetensors_file, with_user_umask
from perceptio.vocab import PerceptionVocab

__all__ = ["CheckpointMismatchError", "DepthTokenizer", "DepthTokenizerOutput"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "perceptio_depth_tokenizer"


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose weights do not fit its (or the requested) configuration."""


@dataclass
class DepthTokenizerOutput:
    """What :meth:`DepthTokenizer.forward` returns.

    Attributes:
        reconstruction: (B, H, W) in [0, 1].
        codes: (B, h, w) int64.
        loss: reconstruction MSE (in the network's [-1, 1] space) + commitment_weight * commitment.
        reconstruction_loss: the MSE term.
        commitment_loss: the commitment term (unweighted).
    """

    reconstruction: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor


# Every ReLU follows a convolution, whose backward pass does not read its output: in place, it saves a buffer of
# its size (the same values and gradients; the soft-merging loss's decoder pass 28 -> 23 ms on a CPU)
class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(config: DepthTokenizerConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = 1
    for channels in config.channels:
        layers += [nn.Conv2d(previous, channels, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        previous = channels
    layers += [_ResBlock(previous) for _ in range(config.num_res_blocks)]
    layers.append(nn.Conv2d(previous, config.code_dim, 1))
    return nn.Sequential(*layers)


def _decoder(config: DepthTokenizerConfig) -> nn.Sequential:
    top = config.channels[-1]
    layers: list[nn.Module] = [nn.Conv2d(config.code_dim, top, 1)]
    layers += [_ResBlock(top) for _ in range(config.num_res_blocks)]
    previous = top
    for channels in (top, *reversed(config.channels[:-1])):
        layers += [nn.ConvTranspose2d(previous, channels, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        previous = channels
    layers.append(nn.Conv2d(previous, 1, 1))
    return nn.Sequential(*layers)


class DepthTokenizer(nn.Module):
    """A VQ-VAE over normalised depth maps. Build from a preset name or a config.

    Example:
        >>> tok = DepthTokenizer.from_preset("tiny")
        >>> codes = tok.encode(torch.rand(2, 64, 64))          # (2, 8, 8)
        >>> tok.decode(codes).shape
        torch.Size([2, 64, 64])
    """

    def __init__(self, config: DepthTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.quantizer = EMAQuantizer(
            config.num_codes,
            config.code_dim,
            decay=config.ema_decay,
            epsilon=config.epsilon,
            dead_code_threshold=config.dead_code_threshold,
        )
        self.decoder = _decoder(config)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> DepthTokenizer:
        """Build a randomly initialised tokenizer from a preset (``aurora`` or ``tiny``) with optional overrides."""
        return cls(DepthTokenizerConfig.from_preset(name, **overrides))

    @property
    def vocab(self) -> PerceptionVocab:
        """The perception vocabulary matching this codebook and grid."""
        return PerceptionVocab(num_depth_codes=self.config.num_codes, depth_grid=self.config.grid)

    # ------------------------------------------------------------------------------------------- validation

    def _check_depth(self, depth: torch.Tensor | np.ndarray) -> torch.Tensor:
        tensor = torch.as_tensor(depth)
        if tensor.ndim == 4 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        size = self.config.input_size
        if tensor.ndim != 3 or tensor.shape[-2:] != (size, size):
            raise DepthInputError(
                f"expected depth maps of shape (B, {size}, {size}), got {tuple(torch.as_tensor(depth).shape)}; "
                "use DepthTokenizer.prepare() to normalise and resize raw maps"
            )
        if not tensor.is_floating_point():
            raise DepthInputError(f"expected floating-point depth maps, got dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise DepthInputError("depth maps contain NaN or inf; normalise them with DepthTokenizer.prepare()")
        low, high = float(tensor.min()), float(tensor.max())
        if low < -1e-4 or high > 1 + 1e-4:
            raise DepthInputError(
                f"depth maps must be normalised to [0, 1] (got values in [{low:.4g}, {high:.4g}]); "
                "use DepthTokenizer.prepare()"
            )
        param = next(self.parameters())
        return tensor.to(device=param.device, dtype=param.dtype)

    def _check_codes(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        tensor = torch.as_tensor(codes)
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3 or tuple(tensor.shape[-2:]) != self.config.grid:
            raise DepthInputError(
                f"expected codes of shape (B, {self.config.grid[0]}, {self.config.grid[1]}), got {tuple(tensor.shape)}"
            )
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise DepthInputError(f"codes must be integers, got dtype {tensor.dtype}")
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= self.config.num_codes:
            raise DepthInputError(f"code ids must be in [0, {self.config.num_codes}), got values in [{low}, {high}]")
        return tensor.to(device=self.quantizer.codebook.device, dtype=torch.long)

    # -------------------------------------------------------------------------------------------- public API

    def prepare(
        self,
        maps: Sequence[np.ndarray] | np.ndarray,
        *,
        quantity: Quantity = "depth",
        valid: Sequence[np.ndarray] | None = None,
    ) -> torch.Tensor:
        """Normalise raw depth or inverse-depth maps (each (H, W), any size) and resize them to the input size.

        Returns:
            (B, input_size, input_size) float32 in [0, 1], 1 = nearest.
        """
        if isinstance(maps, np.ndarray) and maps.ndim == 2:
            maps = [maps]
        out = []
        for k, raw in enumerate(maps):
            normalized, _ = normalize_depth(
                raw, quantity=quantity, valid=None if valid is None else valid[k], name=f"map {k}"
            )
            out.append(resize_nearest(normalized, self.config.input_size)[0])
        return torch.stack(out)

    def _decode_latent(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        depth = (self.decoder(latent)[:, 0] + 1) / 2
        return depth.clamp(0, 1) if clamp else depth

    def forward(self, depth: torch.Tensor, valid: torch.Tensor | None = None) -> DepthTokenizerOutput:
        """Encode, quantise (EMA update in training mode) and decode a batch (B, H, W) in [0, 1].

        Args:
            depth: (B, H, W) normalised maps.
            valid: optional bool (B, H, W); the reconstruction loss covers only these pixels.
        """
        depth = self._check_depth(depth)
        target = depth * 2 - 1
        quantized = self.quantizer(self.encoder(target.unsqueeze(1)))
        prediction = self.decoder(quantized.quantized)[:, 0]
        if valid is None:
            reconstruction_loss = F.mse_loss(prediction, target)
        else:
            weight = valid.to(prediction.dtype)
            reconstruction_loss = ((prediction - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)
        loss = reconstruction_loss + self.config.commitment_weight * quantized.commitment
        return DepthTokenizerOutput(
            reconstruction=((prediction.detach() + 1) / 2).clamp(0, 1),
            codes=quantized.codes,
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=quantized.commitment,
        )

    @torch.no_grad()
    def encode(self, depth: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Depth (B, H, W) in [0, 1] -> codes (B, h, w) int64. Never updates the codebook."""
        depth = self._check_depth(depth)
        latent = self.encoder(depth.unsqueeze(1) * 2 - 1)
        return self.quantizer(latent, update=False).codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray, *, clamp: bool = True) -> torch.Tensor:
        """Codes (B, h, w) -> depth (B, H, W) in [0, 1] (``clamp=False``: the raw decoder output, same scale).
        Inference only; :meth:`decode_soft` is differentiable."""
        return self._decode_latent(self.quantizer.lookup(self._check_codes(codes)), clamp)

    def decode_soft(
        self,
        probs: torch.Tensor | None = None,
        *,
        logits: torch.Tensor | None = None,
        temperature: float = 1.0,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Soft merging: decode the probability-weighted average of codebook vectors.

        Args:
            probs: (B, h, w, K) or (B, N, K) probabilities over the K codes (each row sums to 1).
            logits: alternatively, (B, h, w, K) or (B, N, K) logits; ``softmax(logits / temperature)`` is used.
            temperature: softmax temperature for ``logits``.
            clamp: clamp to [0, 1]; a training loss passes False, since clamped values carry no gradient.

        Returns:
            (B, H, W) in [0, 1]; gradients flow to ``probs`` / ``logits``. One-hot ``probs`` give exactly
            :meth:`decode` of the same codes.
        """
        if (probs is None) == (logits is None):
            raise ValueError("pass exactly one of probs or logits")
        weights = probs if probs is not None else torch.softmax(logits / temperature, dim=-1)  # type: ignore[operator]
        k, (h, w) = self.config.num_codes, self.config.grid
        if weights.shape[-1] != k:
            raise DepthInputError(f"the last dimension must be the {k} codes, got shape {tuple(weights.shape)}")
        if weights.ndim == 3:
            if weights.shape[1] != h * w:
                raise DepthInputError(f"expected {h * w} positions (a {h}x{w} grid), got {weights.shape[1]}")
            weights = weights.reshape(weights.shape[0], h, w, k)
        if weights.ndim != 4 or tuple(weights.shape[1:3]) != (h, w):
            raise DepthInputError(f"expected (B, {h}, {w}, {k}) or (B, {h * w}, {k}), got {tuple(weights.shape)}")
        weights = weights.to(dtype=self.quantizer.codebook.dtype)
        return self._decode_latent(self.quantizer.soft_lookup(weights), clamp)

    def codes_to_text(self, codes: torch.Tensor | np.ndarray) -> str:
        """One code grid (h, w) -> its depth span text (start marker, h * w code tokens, end marker)."""
        array = np.asarray(torch.as_tensor(codes).cpu())
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        return self.vocab.render_depth_span(array)

    def text_to_codes(self, text: str) -> torch.Tensor:
        """Parse one depth span into codes (h, w); raises :class:`perceptio.vocab.DepthSpanError` if malformed."""
        return torch.from_numpy(self.vocab.parse_depth_span(text))

    # ------------------------------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights and codebook buffers) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"model_type": MODEL_TYPE, "format_version": 1, **self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"model_type": MODEL_TYPE})
        with_user_umask(directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, expected: DepthTokenizerConfig | None = None, map_location: str = "cpu"
    ) -> DepthTokenizer:
        """Load a tokenizer saved by :meth:`save_pretrained`.

        Args:
            directory: the checkpoint folder.
            expected: if given, the checkpoint's config must equal it (e.g. the one a model was built with).
            map_location: device to load the weights on.

        Raises:
            FileNotFoundError: the folder lacks config.json or model.safetensors.
            CheckpointMismatchError: the config differs from ``expected``, or the weights do not fit the config.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found; a depth-tokenizer checkpoint holds {CONFIG_NAME} and {WEIGHTS_NAME}"
                )
        payload = json.loads(config_path.read_text())
        if payload.get("model_type") != MODEL_TYPE:
            raise CheckpointMismatchError(
                f"{config_path}: model_type is {payload.get('model_type')!r}, expected {MODEL_TYPE!r}"
            )
        config = DepthTokenizerConfig.from_dict(payload)
        if expected is not None and config != expected:
            diffs = {k: (v, getattr(expected, k)) for k, v in config.to_dict().items() if v != expected.to_dict()[k]}
            raise CheckpointMismatchError(
                f"{directory}: the checkpoint's config differs from the expected one in "
                + ", ".join(f"{k} (checkpoint {a}, expected {b})" for k, (a, b) in diffs.items())
            )
        model = cls(config)
        check_safetensors_file(weights_path)  # an empty or cut-short file: an error naming it
        state = load_file(str(weights_path), device=map_location)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            details = [f"{k}: weights {tuple(state[k].shape)} vs config {tuple(own[k].shape)}" for k in wrong[:5]]
            if missing:
                details.append(f"missing {missing[:5]}")
            if unexpected:
                details.append(f"unexpected {unexpected[:5]}")
            raise CheckpointMismatchError(
                f"{weights_path} does not fit {config_path} (was config.json edited, or the files mixed up?): "
                + "; ".join(details)
            )
        model.load_state_dict(state)
        return model.to(map_location).eval()
