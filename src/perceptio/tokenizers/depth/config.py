"""The depth tokenizer's configuration and named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["PRESETS", "DepthTokenizerConfig"]


@dataclass(frozen=True)
class DepthTokenizerConfig:
    """Architecture of the depth VQ-VAE. Serialised as ``config.json`` next to the weights.

    The encoder has one 4x4 stride-2 convolution per entry of ``channels`` (so the grid is ``input_size /
    2**len(channels)``), then residual blocks and a 1x1 projection to ``code_dim``; the decoder mirrors it with
    transposed convolutions. Defaults are AURORA's: 320x320 input, x32 downsampling to a 10x10 grid, K = 128
    codes of dimension 512, EMA updates with decay 0.99, commitment 0.25.
    """

    input_size: int = 320
    """Side of the square depth map the network reads, pixels."""
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    """Output channels of the encoder's stride-2 convolutions (the decoder uses them in reverse)."""
    num_res_blocks: int = 2
    """Residual blocks after the encoder's downsampling and before the decoder's upsampling."""
    code_dim: int = 512
    """Dimension of a codebook vector."""
    num_codes: int = 128
    """K, the number of codes (one depth token each, see perceptio.vocab)."""
    ema_decay: float = 0.99
    """Decay of the exponential moving averages that update the codebook."""
    commitment_weight: float = 0.25
    """Weight of the commitment loss that pulls encoder outputs towards their codes."""
    epsilon: float = 1e-5
    """Laplace smoothing of the EMA cluster sizes."""
    dead_code_threshold: float = 0.5
    """A code whose EMA cluster size falls below this is restarted at a random encoder output (0: never)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels}")
        if self.input_size % self.downsample:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by the downsampling factor {self.downsample} "
                f"(2**len(channels)); pick input_size as a multiple of {self.downsample}"
            )
        if self.num_codes < 2 or self.code_dim < 1 or self.num_res_blocks < 0:
            raise ValueError("num_codes must be >= 2, code_dim >= 1 and num_res_blocks >= 0")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid."""
        side = self.input_size // self.downsample
        return (side, side)

    @property
    def num_tokens(self) -> int:
        """Codes per depth map (the length of a depth span)."""
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["channels"] = list(self.channels)
        return payload

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DepthTokenizerConfig:
        """A preset's config (``aurora`` or ``tiny``), with optional field overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown depth-tokenizer preset {name!r}; available: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name].to_dict(), **overrides})

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> DepthTokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known - {"model_type", "format_version"})
        if unknown:
            raise ValueError(f"unknown depth-tokenizer config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in payload.items() if k in known})


#: Named presets. ``aurora``: the paper-scale geometry (100 codes per map). ``tiny``: 64x64 -> 8x8 = 64 codes,
#: K = 32, small enough to train in well under a minute on a CPU.
PRESETS: dict[str, DepthTokenizerConfig] = {
    "aurora": DepthTokenizerConfig(),
    "tiny": DepthTokenizerConfig(input_size=64, channels=(16, 32, 64), num_res_blocks=1, code_dim=32, num_codes=32),
}
