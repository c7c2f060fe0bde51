"""read_conversations on LLaVA-style JSON and InternVL-style JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers import READERS, check_samples, read_conversations
from perceptio.data.schema import Task, Turn


def _record(rid: str, image: object = "a.jpg", **extra: object) -> dict:
    record = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Is it large?"},
            {"from": "gpt", "value": "No."},
        ],
        **extra,
    }
    if image is not None:
        record["image"] = image
    return record


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (12, 9), (255, 0, 0)).save(tmp_path / "a.jpg")
    Image.new("RGB", (7, 7), (0, 0, 255)).save(tmp_path / "b.png")
    return tmp_path


def test_llava_json_list(folder: Path) -> None:
    text_only = {"id": 3, "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}
    path = folder / "llava_mix.json"
    path.write_text(json.dumps([_record("r1"), _record("r2", image=["a.jpg", "b.png"]), text_only]))
    first, two_images, text = read_conversations(path, split="train")
    assert (first.sample_id, first.task, first.source, first.split) == ("r1", Task.VQA, "llava_mix", "train")
    assert first.query == "<image>\nWhat is shown?" and first.answer == "A red square."
    assert first.conversation == (
        Turn("user", "<image>\nWhat is shown?"),
        Turn("assistant", "A red square."),
        Turn("user", "Is it large?"),
        Turn("assistant", "No."),
    )
    assert first.image.path == folder / "a.jpg" and first.meta == {"id": "r1"}
    assert [ref.load().size for ref in two_images.images] == [(12, 9), (7, 7)]
    assert text.images == () and text.sample_id == "3" and text.answer == "Hello"
    assert check_samples([first, two_images, text], progress=False) == 3
    assert READERS["conversation"] is read_conversations


def test_jsonl_with_task_system_turn_and_extras(folder: Path) -> None:
    record = _record("s1", task="referring_segmentation", scene_id="scene_4", source_world="v2")
    record["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    path = folder / "synthetic.jsonl"
    path.write_text(json.dumps(record) + "\n\n" + json.dumps(_record("s2", task="vqa")) + "\n")
    images = folder / "imgs"
    images.mkdir()
    first, second = read_conversations(path, image_root=images, source="synthetic")
    assert first.task is Task.REFERRING_SEGMENTATION and second.task is Task.VQA
    assert first.meta == {"scene_id": "scene_4", "source_world": "v2", "id": "s1", "system": "Be brief."}
    assert len(first.conversation) == 4 and first.source == "synthetic"
    assert first.image.path == images / "a.jpg"


def test_more_placeholders_than_images(folder: Path) -> None:
    record = _record("r9", image="a.jpg")
    record["conversations"][2]["value"] = "<image>\nAnd this one?"
    path = folder / "bad.jsonl"
    path.write_text(json.dumps(_record("ok")) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2 \[id r9\]: 2 <image> placeholder\(s\) but 1 image\(s\)"):
        read_conversations(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "x", "image": "a.jpg"}, r"\[id x\]: 'conversations' is missing or empty"),
        ({"id": "x", "conversations": []}, r"\[id x\]: 'conversations' is missing or empty"),
        (
            {"id": "x", "conversations": [{"from": "robot", "value": "beep"}]},
            r"\[id x\]: turn 0 has unknown role 'robot'. "
            r"Fix: use one of \['assistant', 'gpt', 'human', 'system', 'user'\]",
        ),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}, r"\[id x\]: conversation has no user turn"),
        ({"id": "x", "conversations": [{"from": "human"}]}, r"\[id x\]: turn 0 has no 'value' text"),
        (_record("x", task="segment"), r"\[id x\]: unknown task 'segment'. Fix: use one of \['referring_segmentation'"),
        (_record("x", image=["a.jpg", 3]), r"\[id x\]: 'image' is \['a.jpg', 3\]"),
        ([1, 2], r"\[record 0\]: record is a list"),
    ],
)
def test_bad_records(folder: Path, record: object, message: str) -> None:
    path = folder / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError, match=message):
        read_conversations(path)


def test_malformed_json_and_top_level(folder: Path) -> None:
    path = folder / "broken.json"
    path.write_text('[\n  {"id": 1,\n  "conversations": ]\n')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON \(Expecting value, column 20\)"):
        read_conversations(path)
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(DataError, match=r"top level is a JSON dict, expected a list of records"):
        read_conversations(path)
    with pytest.raises(DataError, match=r"missing\.json: conversation JSON not found"):
        read_conversations(folder / "missing.json")


def test_skip_bad_jsonl_records_lines(folder: Path) -> None:
    path = folder / "mix.jsonl"
    lines = [
        json.dumps(_record("ok1")),
        '{"id": "cut", "conversations": [',
        json.dumps({"id": "norole", "conversations": [{"value": "x"}]}),
        "[1, 2]",
        json.dumps(_record("ok2", image=None, conversations=[{"from": "human", "value": "hi"}])),
    ]
    path.write_text("\n".join(lines) + "\n")
    report = BadItemReport()
    samples = read_conversations(path, skip_bad=True, report=report)
    assert [(s.sample_id, s.answer) for s in samples] == [("ok1", "A red square."), ("ok2", None)]
    assert [item.location for item in report.items] == [f"{path}:2", f"{path}:3 [id norole]", f"{path}:4"]
    assert [item.problem for item in report.items] == [
        "malformed JSON line (Expecting value, column 33)",
        "turn 0 has unknown role None",
        "line holds a JSON list, expected an object",
    ]
