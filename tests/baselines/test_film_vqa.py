"""The FiLM VQA baseline: its report on a small world, that the network can learn a spatial rule, and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from perceptio.baselines import FilmBaselineConfig, FilmVQA, train_film_baseline
from perceptio.data.readers import read_conversations

# Small enough to run in well under a second on one thread; the defaults are for real worlds.
FAST = FilmBaselineConfig(steps=30, batch_size=16, width=16, image_size=32, threads=1)


def test_report_on_small_world(world_dir: Path) -> None:
    threads = torch.get_num_threads()
    result = train_film_baseline(world_dir, FAST)

    val = read_conversations(world_dir / "vqa" / "val.json", image_root=world_dir / "images")
    train = read_conversations(world_dir / "vqa" / "train.json", image_root=world_dir / "images")
    assert {"accuracy", "by_category", "steps", "seconds", "train_questions", "val_questions", "parameters"} <= set(
        result
    )
    assert result["steps"] == 30
    assert result["train_questions"] == len(train) > 0
    assert result["val_questions"] == len(val) > 0
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["seconds"] > 0
    assert result["parameters"] > 0
    assert result["config"] == {
        "image_size": 32,
        "steps": 30,
        "batch_size": 16,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "width": 16,
        "seed": 0,
        "threads": 1,
        "eval_batch_size": 256,
    }
    categories = result["by_category"]
    assert set(categories) == {s.meta.get("category") for s in val}
    assert sum(c["count"] for c in categories.values()) == len(val)
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in categories.values())
    overall = sum(c["accuracy"] * c["count"] for c in categories.values()) / len(val)
    assert result["accuracy"] == pytest.approx(overall)
    assert torch.get_num_threads() == threads  # restored after training


def _halves(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose left and right halves have random brightness; label 1 when the left half is brighter."""
    levels = torch.rand(n, 2, generator=generator)
    images = 0.5 * torch.rand(n, 3, 32, 32, generator=generator)
    images[..., :16] += 0.5 * levels[:, 0, None, None, None]
    images[..., 16:] += 0.5 * levels[:, 1, None, None, None]
    labels = (images[..., :16].mean(dim=(1, 2, 3)) > images[..., 16:].mean(dim=(1, 2, 3))).long()
    return (images - 0.5) / 0.25, labels


def test_film_network_learns_left_right_brightness() -> None:
    """The question is constant, so the answer can only come from the image: a network that ignores its pixels or
    cannot tell left from right stays near chance (the classes are about balanced)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        images, labels = _halves(generator, 64)
        held_out, held_out_labels = _halves(generator, 256)
        assert 0.3 < labels.float().mean() < 0.7
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = FilmVQA(vocab_size=3, num_answers=2, width=8)
        tokens = torch.full((256, 1), 2, dtype=torch.long)
        lengths = torch.ones(256, dtype=torch.long)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(150):
            loss = F.cross_entropy(model(images, tokens[:64], lengths[:64]), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            train_accuracy = (model(images, tokens[:64], lengths[:64]).argmax(1) == labels).float().mean()
            held_out_accuracy = (model(held_out, tokens, lengths).argmax(1) == held_out_labels).float().mean()
    finally:
        torch.set_num_threads(old_threads)
    assert train_accuracy >= 0.9
    assert held_out_accuracy >= 0.75  # it learnt the rule (0.88 at the time of writing), not only the 64 images


def test_question_vector_is_last_valid_state() -> None:
    model = FilmVQA(vocab_size=10, num_answers=3, width=4)
    short = torch.tensor([[4, 5, 0, 0]])
    padded_more = torch.tensor([[4, 5, 0, 0, 0, 0]])
    a = model.encode_question(short, torch.tensor([2]))
    b = model.encode_question(padded_more, torch.tensor([2]))
    c = model.encode_question(torch.tensor([[4, 5]]), torch.tensor([2]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_missing_vqa_file_names_path(world_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="perceptio data synth") as info:
        train_film_baseline(tmp_path, FAST)
    assert str(tmp_path / "vqa" / "train.json") in str(info.value)

    partial = tmp_path / "partial"
    (partial / "vqa").mkdir(parents=True)
    shutil.copy(world_dir / "vqa" / "train.json", partial / "vqa" / "train.json")
    with pytest.raises(FileNotFoundError) as info:
        train_film_baseline(partial, FAST)
    assert str(partial / "vqa" / "val.json") in str(info.value)


def test_empty_train_split(tmp_path: Path) -> None:
    (tmp_path / "vqa").mkdir()
    for split in ("train", "val"):
        (tmp_path / "vqa" / f"{split}.json").write_text("[]")
    with pytest.raises(ValueError, match="no answered questions"):
        train_film_baseline(tmp_path, FAST)


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("batch_size", -1), ("image_size", 2), ("lr", 0.0), ("weight_decay", -1e-4), ("threads", 0)],
)
def test_config_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"FilmBaselineConfig\.{field}\b"):
        FilmBaselineConfig(**{field: value})
