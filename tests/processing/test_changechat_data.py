import json

import pytest

from processing.changechat_data import (
    is_unchanged_caption_set,
    load_changechat,
    load_levircc,
    load_records,
    missing_images,
    task_of_question,
)
from processing.conversation import TASK_PROMPTS

IMAGES = ["train/A/train_000016.png", "train/B/train_000016.png"]


def _turns(*pairs):
    turns = []
    for index, (question, answer) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image> <image> " if index == 0 else "") + question}, {"from": "gpt", "value": answer}]
    return turns


@pytest.fixture
def image_root(shared_dir):
    return shared_dir / "data" / "levir_cc" / "sample" / "images"


def test_levircc_split_records(shared_dir, image_root):
    records = load_levircc(shared_dir / "data" / "levir_cc" / "LevirCCcaptions.json", image_root, split="test")
    assert len(records) == 1929
    first = records[0]
    assert first["id"].startswith("Levir_CC_test_img") and first["task"] == "caption"
    assert len(first["references"]) == 5 and first["image_before"].endswith("test/A/" + first["image_before"].split("/")[-1])
    assert set(records["changeflag"]) == {0, 1}
    assert len(missing_images(records)) == 2 * 1929 - 2  # only test_000289 is among the sample images


def test_instruction_files_get_their_task_from_name_or_questions(tmp_path, image_root):
    binary = tmp_path / "changechat_105k_test_binary.json"
    binary.write_text(json.dumps([{"id": 7, "image": IMAGES, "conversations": _turns((TASK_PROMPTS["binary"], "Yes"))}]))
    record = load_changechat(binary, image_root)[0]
    assert (record["id"], record["task"], record["answers"], record["references"]) == ("7", "binary", ["Yes"], ["Yes"])
    assert record["questions"] == [TASK_PROMPTS["binary"]]  # the <image> placeholders are stripped
    mixed = tmp_path / "changechat_train.json"
    mixed.write_text(json.dumps([
        {"id": "a", "image": IMAGES, "conversations": _turns((TASK_PROMPTS["count"], "2 new roads"))},
        {"id": "b", "image": IMAGES, "conversations": _turns((TASK_PROMPTS["binary"], "Yes"), (TASK_PROMPTS["count"], "1"))},
        {"id": "c", "image": IMAGES, "conversations": _turns(("Is there water?", "no"))},
    ]))
    assert load_records(mixed, image_root)["task"] == ["count", "dialogue", "open"]


def test_caption_schema_and_unchanged_detection(tmp_path, image_root):
    captions = tmp_path / "changechat_105k_test.json"
    unchanged = ["there is no difference .", "the two scenes seem identical .", "the scene is the same as before .",
                 "no change has occurred .", "almost nothing has changed ."]
    captions.write_text(json.dumps([
        {"image_A": IMAGES[0], "image_B": IMAGES[1], "captions": unchanged},
        {"image_A": "train/A/train_000051.png", "image_B": "train/B/train_000051.png", "captions": ["a road appears"], "changeflag": 1},
    ]))
    records = load_records(captions, image_root)
    assert records["changeflag"] == [0, 1] and records["task"] == ["caption", "caption"]
    assert records[0]["references"][0] == "there is no difference"
    assert is_unchanged_caption_set(records[0]["references"]) and not is_unchanged_caption_set(["a road appears"])


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"id": 1, "image": ["../../../etc/passwd", IMAGES[1]], "conversations": _turns(("q", "a"))}, "escapes the image root"),
        ({"id": 1, "image": [IMAGES[0]], "conversations": _turns(("q", "a"))}, "list of two paths"),
        ({"id": 1, "image": IMAGES, "conversations": [{"from": "human", "value": "q"}]}, "no answer"),
        ({"image": IMAGES, "conversations": _turns(("q", "a"))}, "missing 'id'"),
        ({"id": 1, "images": IMAGES}, "neither"),
    ],
)
def test_bad_records_name_the_record(tmp_path, image_root, entry, message):
    path = tmp_path / "changechat_test.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message) as error:
        load_records(path, image_root)
    assert "record 1" in str(error.value)


def test_duplicate_ids_and_missing_file(tmp_path, image_root):
    path = tmp_path / "changechat_test.json"
    entry = {"id": 1, "image": IMAGES, "conversations": _turns(("q", "a"))}
    path.write_text(json.dumps([entry, entry]))
    with pytest.raises(ValueError, match="duplicate id"):
        load_records(path, image_root)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.json", image_root)


def test_task_of_question():
    assert task_of_question("please judge whether these two images have changed please answer yes or no") == "binary"
    assert task_of_question(TASK_PROMPTS["localization"]) == "localization"
    assert task_of_question(TASK_PROMPTS["dialogue_summary"]) == "caption"
    assert task_of_question("What color are the new roofs?") == "open"


def test_jsonl_and_byte_order_marks_are_read(tmp_path, image_root):
    """A ChangeChat file converted to JSON Lines, or saved with a byte-order mark, gives the same records."""
    entries = [{"id": i, "image": IMAGES, "conversations": _turns((TASK_PROMPTS["binary"], "Yes."))} for i in (1, 2)]
    as_json = tmp_path / "changechat_test_binary.json"
    as_json.write_text(json.dumps(entries), encoding="utf-8-sig")
    as_jsonl = tmp_path / "changechat_test_binary.jsonl"
    as_jsonl.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    expected = load_records(as_json, image_root).to_list()
    assert [record["id"] for record in expected] == ["1", "2"] and expected[0]["task"] == "binary"
    assert load_records(as_jsonl, image_root).to_list() == expected
    as_jsonl.write_text(json.dumps(entries[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_records(as_jsonl, image_root)
