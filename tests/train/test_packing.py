"""A data worker's item packed into one buffer comes back with the same structure, values, dtypes and shapes."""

from __future__ import annotations

import pickle

import pytest
import torch

from perceptio.models.modeling_perceptio import FrozenTargets
from perceptio.utils.packing import pack, unpack


def test_a_packed_item_comes_back_whole() -> None:
    torch.manual_seed(0)
    item = (
        ["refseg", "vqa"],
        [
            (
                0,
                ["refseg"],
                {
                    "input_ids": torch.randint(0, 500, (2, 7)),
                    "pixel_values": torch.randn(2, 3, 5, 5),
                    "gt_masks": [torch.rand(1, 4, 4) > 0.5, None, torch.zeros(0, 4, 4, dtype=torch.bool)],
                    "frozen": FrozenTargets({0: (torch.randn(16, 1, 8), torch.randn(4, 1, 3))}, torch.randn(1, 6, 6)),
                    "scale": torch.tensor(0.5, dtype=torch.float64),
                    "half": torch.randn(3, dtype=torch.bfloat16),
                },
            )
        ],
        (-1, {"hits": 3}),
    )
    packed = pickle.loads(pickle.dumps(pack(item)))  # what a worker hands over
    back = unpack(packed)
    assert back[0] == item[0] and back[2] == item[2] and back[1][0][:2] == item[1][0][:2]
    original, restored = item[1][0][2], back[1][0][2]
    for key in ("input_ids", "pixel_values", "scale", "half"):
        assert restored[key].dtype == original[key].dtype and torch.equal(restored[key], original[key])
    assert restored["gt_masks"][1] is None
    for a, b in zip(original["gt_masks"][::2], restored["gt_masks"][::2], strict=True):
        assert b.dtype == torch.bool and b.shape == a.shape and torch.equal(a, b)
    frozen = restored["frozen"]
    assert isinstance(frozen, FrozenTargets) and list(frozen.image_features) == [0]
    levels = zip(original["frozen"].image_features[0], frozen.image_features[0], strict=True)
    assert all(torch.equal(a, b) for a, b in levels)
    assert torch.equal(frozen.depth_reference, original["frozen"].depth_reference)
    # one buffer: the tensors are views of it
    assert all(
        t.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()
        for t in (restored["input_ids"], frozen.depth_reference, restored["gt_masks"][0])
    )


def test_packing_refuses_a_tensor_with_gradient() -> None:
    with pytest.raises(ValueError, match="without gradient"):
        pack({"x": torch.zeros(2, requires_grad=True)})
