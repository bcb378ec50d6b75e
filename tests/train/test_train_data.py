"""Training data: records -> samples (templates, dialogue rounds, one sample per caption), bad inputs caught before
any compute, the paired augmentation, the collator's training layout. No model involved."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from processing.conversation import GRID_CELLS, TASK_PROMPTS

SAMPLE_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "levir_cc" / "sample"
IMAGES = SAMPLE_ROOT / "images"
BINARY = "<image> <image> Please judge whether these two images have changed. Please answer yes or no."
SUMMARY = "Based on the above analysis, please describe the changes of these two images in detail."


def data_args(**overrides):
    from train.args import DataArguments

    return DataArguments(**{"image_root": str(IMAGES), "val_split": None, "levircc_train_split": None, **overrides})


def write_records(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def dialogue(record_id="d0", pair=("train/A/train_000016.png", "train/B/train_000016.png"), last_answer="Houses were built."):
    return {"id": record_id, "image": list(pair), "conversations": [
        {"from": "human", "value": BINARY}, {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": SUMMARY}, {"from": "gpt", "value": last_answer}]}


def config_without_a_model(tmp_path, train_file) -> Path:
    """A training config whose model path does not exist: whatever fails must fail before loading it."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tmp_path / 'no-model-here'}}}\n"
        f"data: {{train_files: [{train_file}], image_root: {IMAGES}, val_split: null}}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, use_cpu: true}}\n"
    )
    return config


def samples_of(tmp_path, records, **overrides):
    from train.data import load_train_records, records_to_samples

    args = data_args(train_files=[write_records(tmp_path / "train.json", records)], **overrides)
    return records_to_samples(load_train_records(args), template=args.template, captions_per_pair=args.captions_per_pair)


def test_dialogue_rounds_match_the_chat_template(tmp_path, shared_dir, tiny_processor):
    samples = samples_of(tmp_path, [dialogue()])
    assert samples["answer"] == ["yes", "houses were built"]
    assert samples["prompt"][0] == "q please judge whether these two images have changed please answer yes or no"
    # what training sees is what inference renders from the same conversation
    messages = [{"role": "user", "content": BINARY.replace("<image> ", "")}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": SUMMARY}]
    assert samples["prompt"][1] == tiny_processor.apply_chat_template(messages)
    assert samples["index"] == [0, 1]


def test_plain_template_keeps_text_verbatim(tmp_path, shared_dir):
    samples = samples_of(tmp_path, [dialogue()], template="plain")
    assert samples["prompt"] == [BINARY.replace("<image> ", ""), SUMMARY]
    assert samples["answer"] == ["Yes.", "Houses were built."]


def test_long_answers_keep_their_first_50_words(tmp_path, shared_dir):
    long_answer = " ".join(f"w{i}" for i in range(80))
    samples = samples_of(tmp_path, [dialogue(last_answer=long_answer)])
    assert samples["answer"][1].split() == [f"w{i}" for i in range(50)]


def test_levircc_captions_one_sample_per_reference(shared_dir):
    from train.data import load_train_records, records_to_samples

    args = data_args(levircc_captions=str(SAMPLE_ROOT / "captions.json"), levircc_train_split="train")
    records = load_train_records(args)
    assert len(records) == 5  # the five train pairs of the sample
    every = records_to_samples(records, captions_per_pair="all")
    first = records_to_samples(records, captions_per_pair="first")
    assert len(every) == 25 and len(first) == 5
    assert set(every["prompt"]) == {"q please briefly describe the changes in these two images"}
    first_pair = [answer for record_id, answer in zip(every["id"], every["answer"]) if record_id == every[0]["id"]]
    assert len(set(first_pair)) == 5


def test_validation_split_from_levircc(shared_dir):
    from train.data import caption_prompt, load_val_records

    records = load_val_records(data_args(levircc_captions=str(SAMPLE_ROOT / "captions.json"), val_split="test"))
    assert len(records) == 1 and len(records[0]["references"]) == 5
    assert caption_prompt("deltavlm") == "q please briefly describe the changes in these two images"
    assert caption_prompt("plain") == TASK_PROMPTS["caption"]
    with pytest.raises(ValueError, match="levircc_captions"):
        load_val_records(data_args(val_split="val"))


# --- bad inputs: each a clear error before any model is loaded ---


def test_record_without_answer_turn_is_an_error(tmp_path, shared_dir):
    record = dialogue()
    record["conversations"] = record["conversations"][:3]  # ends with a question
    with pytest.raises(ValueError, match=r"record 1.*no answer"):
        samples_of(tmp_path, [record])


def test_empty_answer_is_an_error(tmp_path, shared_dir):
    with pytest.raises(ValueError, match=r"question without an answer.*d0"):
        samples_of(tmp_path, [dialogue(last_answer="  ")])


def test_missing_images_are_listed_or_skipped(tmp_path, shared_dir, caplog):
    from train.data import load_train_records

    records = [dialogue("ok"), dialogue("gone", pair=("train/A/nope_1.png", "train/B/nope_1.png"))]
    args = data_args(train_files=[write_records(tmp_path / "train.json", records)])
    with pytest.raises(FileNotFoundError, match=r"2 training image file\(s\) not found[\s\S]*nope_1\.png"):
        load_train_records(args)
    args.skip_missing_images = True
    with caplog.at_level("WARNING"):
        kept = load_train_records(args)
    assert kept["id"] == ["ok"]
    assert "skipped 1 of 2 records" in caplog.text


def test_bad_input_fails_before_the_model_loads(tmp_path, shared_dir):
    """The model path does not exist: the data error must come first."""
    from train.run_train import main

    record = dialogue(pair=("train/A/missing.png", "train/B/missing.png"))
    config = config_without_a_model(tmp_path, write_records(tmp_path / "train.json", [record]))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        main(["--config", str(config)])


# --- paired augmentation ---


def test_augmentation_moves_before_and_after_together():
    from train.augment import PairedAugment

    pixels = np.arange(48 * 64 * 3).reshape(48, 64, 3) % 251
    before, after = Image.fromarray(pixels.astype(np.uint8)), Image.fromarray((pixels + 3).astype(np.uint8))
    augment = PairedAugment("geometric", min_crop_scale=0.5)
    seen = set()
    for seed in range(12):
        a, b = augment(before, after, text="houses appear", generator=torch.Generator().manual_seed(seed))
        a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
        assert (b == a + 3).all(), "A and B were transformed differently"
        seen.add((a.shape, a[0, 0, 0]))
    assert len(seen) > 6  # different draws do different things
    # same generator seed, same result: what makes augmented runs resumable
    one = augment(before, after, generator=torch.Generator().manual_seed(5))[0]
    two = augment(before, after, generator=torch.Generator().manual_seed(5))[0]
    assert np.array_equal(np.asarray(one), np.asarray(two))


def test_no_flips_when_the_text_names_positions():
    from train.augment import PairedAugment

    image = Image.fromarray((np.arange(32 * 32 * 3).reshape(32, 32, 3) % 256).astype(np.uint8))
    augment = PairedAugment("geometric", min_crop_scale=1.0)  # no crop: only flips/rotations could change it
    for seed in range(8):
        a, _ = augment(image, image, text="a house appears at the top left", generator=torch.Generator().manual_seed(seed))
        assert np.array_equal(np.asarray(a), np.asarray(image))
    changed = [not np.array_equal(np.asarray(augment(image, image, generator=torch.Generator().manual_seed(s))[0]),
                                  np.asarray(image)) for s in range(8)]
    assert any(changed)  # without position words the same draws do flip/rotate


# --- collator ---


def test_collator_builds_the_training_layout(tmp_path, shared_dir, tiny_processor):
    from train.collator import TrainCollator

    samples = samples_of(tmp_path, [dialogue()]).to_list()
    batch = TrainCollator(tiny_processor)(samples)
    assert batch["pixel_values"].shape == (2, 2, 3, 28, 28)
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[:, :4] == -100).all()  # image tokens
    expected = tiny_processor(images=[(str(IMAGES / "train/A/train_000016.png"), str(IMAGES / "train/B/train_000016.png"))] * 2,
                              text=[s["prompt"] for s in samples], answers=[s["answer"] for s in samples])
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(labels, expected["labels"])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    augmented = TrainCollator(tiny_processor, augment="crop", seed=0)
    first = augmented(samples)["pixel_values"]
    augmented.epoch = 1
    assert not torch.equal(first, augmented(samples)["pixel_values"])  # a new epoch, new crops
    augmented.epoch = 0
    assert torch.equal(first, augmented(samples)["pixel_values"])


# --- task weights ---

def binary_record(i):
    return {"id": f"b{i}", "image": ["train/A/train_000016.png", "train/B/train_000016.png"],
            "conversations": [{"from": "human", "value": BINARY}, {"from": "gpt", "value": "Yes."}]}


def localization_record(i):
    question = "<image> <image> " + TASK_PROMPTS["localization"]
    return {"id": f"l{i}", "image": ["train/A/train_000016.png", "train/B/train_000016.png"],
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "top left"}]}


def test_task_weights_repeat_and_thin_tasks(tmp_path, shared_dir):
    from train.data import task_mix, weigh_tasks

    samples = samples_of(tmp_path, [binary_record(i) for i in range(200)] + [localization_record(i) for i in range(10)])
    weighted = weigh_tasks(samples, {"localization": 3, "binary": 0.5}, seed=0)
    tasks = weighted["task"]
    assert tasks.count("localization") == 30
    assert sorted(set(weighted.filter(lambda r: r["task"] == "localization")["id"])) == sorted(f"l{i}" for i in range(10))
    assert 70 <= tasks.count("binary") <= 130  # Bernoulli(0.5) per sample: 100 expected
    assert weighted["index"] == list(range(len(weighted)))  # repeats get their own augmentation seed
    # the draw is fixed by the seed (a resumed run sees the same mix), different seeds thin differently
    assert weigh_tasks(samples, {"binary": 0.5}, seed=0)["id"] == weigh_tasks(samples, {"binary": 0.5}, seed=0)["id"]
    assert weigh_tasks(samples, {"binary": 0.5}, seed=0)["id"] != weigh_tasks(samples, {"binary": 0.5}, seed=1)["id"]
    assert weigh_tasks(samples, None)["id"] == samples["id"]
    assert task_mix(weighted).startswith("binary ") and "localization 30" in task_mix(weighted)


def test_task_weights_errors_name_the_fault(tmp_path, shared_dir):
    from train.data import parse_task_weights, weigh_tasks

    assert parse_task_weights('{"localization": 2, "count": 1.5}') == {"localization": 2.0, "count": 1.5}
    with pytest.raises(ValueError, match="unknown task 'locallization'"):
        parse_task_weights({"locallization": 2})
    with pytest.raises(ValueError, match=r"task_weights\['binary'\] must be a number >= 0"):
        parse_task_weights({"binary": -1})
    with pytest.raises(ValueError, match="not a JSON mapping"):
        parse_task_weights("localization=2")
    samples = samples_of(tmp_path, [binary_record(0)])
    with pytest.raises(ValueError, match="leave no training sample"):
        weigh_tasks(samples, {"binary": 0})


def test_task_weights_from_the_command_line_fail_before_loading(tmp_path, shared_dir):
    """A typo'd task in an override is reported before the data or the (missing) model is touched."""
    from train.run_train import main

    config = config_without_a_model(tmp_path, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown task 'loc'"):
        main(["--config", str(config), "--task_weights", '{"loc": 2}'])
    with pytest.raises(ValueError, match=r"data.dialogue_image_swap must lie in \[0, 1\], got 2.0"):
        main(["--config", str(config), "--dialogue_image_swap", "2"])
    with pytest.raises(ValueError, match="data.localization_cell_questions must be >= 0, got -1"):
        main(["--config", str(config), "--localization_cell_questions", "-1"])


def test_cell_questions_are_answered_from_the_localization_answer(tmp_path, shared_dir):
    """Each localization sample gives `per_category` yes/no questions per category, each answered by whether its
    cell is in that category's list; other tasks give none; the draw is fixed by the seed."""
    from eval.parsers import parse_localization
    from train.data import add_cell_questions

    answers = ["roads ['bottom-left'] buildings ['top-left', 'center-center']", "roads [] buildings []",
               "roads [] buildings ['top-left', 'top-center', 'top-right', 'center-left', 'center-center', "
               "'center-right', 'bottom-left', 'bottom-center', 'bottom-right']"]
    records = [binary_record(0)]
    for i, answer in enumerate(answers):
        record = localization_record(i)
        record["conversations"][1]["value"] = answer
        records.append(record)
    samples = samples_of(tmp_path, records)
    extended = add_cell_questions(samples, 2, seed=0)
    added = [row for row in extended if row["id"].endswith("_cell")]
    assert len(added) == 3 * 2 * 2  # 3 localization samples, 2 categories, 2 questions each
    assert extended.select(range(len(samples)))["prompt"] == samples["prompt"]  # the originals stay, in order
    assert extended["index"] == list(range(len(extended)))
    truth = {f"l{i}_cell": parse_localization(answer) for i, answer in enumerate(answers)}
    seen = set()
    for row in added:
        assert row["task"] == "localization" and row["answer"] in ("yes", "no")
        category = "roads" if " road " in row["prompt"] else "buildings"
        cell = next(cell for cell in GRID_CELLS if f" {cell} cell" in row["prompt"])
        assert (cell in truth[row["id"]][category]) == (row["answer"] == "yes"), row
        seen.add((row["id"], category, row["answer"]))
    assert ("l1_cell", "buildings", "yes") not in seen  # nothing listed: every question is a "no"
    assert ("l2_cell", "buildings", "no") not in seen  # everything listed: every question is a "yes"
    assert add_cell_questions(samples, 2, seed=0)["prompt"] == extended["prompt"]
    assert add_cell_questions(samples, 0)["prompt"] == samples["prompt"]
    with pytest.raises(ValueError, match="localization_cell_questions must be >= 0"):
        add_cell_questions(samples, -1)


TRAIN_PAIRS = [(f"train/A/train_{n}.png", f"train/B/train_{n}.png") for n in ("000016", "000051", "000054", "000553", "001652")]


def test_dialogue_image_swap_moves_only_closing_rounds_to_another_pairs_images(tmp_path, shared_dir):
    from train.data import swap_closing_round_images

    records = [dialogue(f"d{i}", TRAIN_PAIRS[i % 5], last_answer=f"answer {i}") for i in range(40)]
    records += [binary_record(i) for i in range(5)]
    samples = samples_of(tmp_path, records)
    swapped = swap_closing_round_images(samples, 0.5, seed=0)
    assert swapped["prompt"] == samples["prompt"] and swapped["answer"] == samples["answer"]
    moved = [i for i in range(len(samples)) if swapped["image_before"][i] != samples["image_before"][i]]
    # only closing rounds (the SUMMARY round, the second sample of each dialogue) move, about half of them
    assert moved and all(samples["task"][i] == "dialogue" and "describe the changes" in samples["prompt"][i]
                         for i in moved)
    assert 10 <= len(moved) <= 30
    for i in moved:  # before and after come from the same other pair
        assert swapped["image_before"][i].replace("/A/", "/B/") == swapped["image_after"][i]
    # a fixed draw per seed (a resumed run sees the same samples), none at share 0, all at share 1
    assert swap_closing_round_images(samples, 0.5, seed=0)["image_before"] == swapped["image_before"]
    assert swap_closing_round_images(samples, 0.0)["image_before"] == samples["image_before"]
    everything = swap_closing_round_images(samples, 1.0, seed=1)
    closing = [i for i in range(len(samples)) if "describe the changes" in samples["prompt"][i]]
    assert len(closing) == 40
    # a donor is another closing round; with five pairs some donors share the pair, but not all of them
    assert sum(everything["image_before"][i] != samples["image_before"][i] for i in closing) >= 20
    with pytest.raises(ValueError, match="dialogue_image_swap"):
        swap_closing_round_images(samples, 1.5)


def test_unreadable_images_are_found_before_training(tmp_path, shared_dir):
    """An empty or corrupt file passes an existence check and would stop the run at its first batch."""
    import shutil

    from train.data import load_train_records

    root = tmp_path / "images"
    for side in ("A", "B"):
        (root / "train" / side).mkdir(parents=True)
        shutil.copy(IMAGES / "train" / side / "train_000016.png", root / "train" / side / "good.png")
    (root / "train" / "A" / "empty.png").write_bytes(b"")
    (root / "train" / "B" / "empty.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 8)
    records = [dialogue("ok", pair=("train/A/good.png", "train/B/good.png")),
               dialogue("bad", pair=("train/A/empty.png", "train/B/empty.png"))]
    args = data_args(image_root=str(root), train_files=[write_records(tmp_path / "train.json", records)])
    with pytest.raises(FileNotFoundError, match=r"2 training image file\(s\) not found or not readable[\s\S]*empty\.png"):
        load_train_records(args)
    args.skip_missing_images = True
    assert load_train_records(args)["id"] == ["ok"]
