"""`deltavlm score`: file layouts, id matching, bad input, and the CCExpert reproduction end to end."""

import json

import pytest

import deltavlm_cli
from eval.score import id_aliases, main
from processing.conversation import TASK_PROMPTS

CCEXPERT = "data/predictions/ccexpert_7b_levircc_test.jsonl"
LEVIR_CC = "data/levir_cc/LevirCCcaptions.json"
CCEXPERT_EXPECTED = {
    "BLEU-1": 86.65, "BLEU-2": 78.47, "BLEU-3": 71.31, "BLEU-4": 65.48,
    "METEOR": 41.82, "ROUGE-L": 76.54, "CIDEr": 143.28,
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_id_aliases():
    assert id_aliases("images/test/A/test_000123.png") == ["images/test/A/test_000123.png", "test_000123.png", "test_000123"]
    assert id_aliases(8148) == ["8148"]


@pytest.mark.parametrize("references", ["levir", "inline"])
def test_ccexpert_reproduction_through_cli(shared_dir, tmp_path, capsys, references):
    """Against LevirCCcaptions.json (changed/unchanged from changeflag) and against the file's own
    references (unchanged = the five no-change templates): the same published numbers."""
    out = tmp_path / "metrics.json"
    argv = ["score", "--predictions", str(shared_dir / CCEXPERT), "--out", str(out)]
    if references == "levir":
        argv += ["--references", str(shared_dir / LEVIR_CC)]
    assert deltavlm_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| all | 1929 | 86.65 | 78.47 | 71.31 | 65.48 | 41.82 | 76.54 | 143.28 |" in printed
    results = json.loads(out.read_text())
    assert results["matching"]["num_matched"] == 1929
    assert results["matching"]["num_duplicate_predictions"] == 7
    caption = results["tasks"]["caption"]
    for metric, expected in CCEXPERT_EXPECTED.items():
        assert caption["all"][metric] == pytest.approx(expected, abs=0.01), metric
    assert (caption["changed"]["num_samples"], caption["unchanged"]["num_samples"]) == (964, 965)


def test_levir_cc_id_forms_and_missing(shared_dir, tmp_path, capsys):
    predictions = write_json(tmp_path / "p.json", [
        {"uid": "Levir_CC_test_img8148", "pred": "the scene is the same as before"},
        {"image_id": "test_000289.png", "caption": "a road is built"},
        {"id": 8149, "prediction": "there is no difference"},
        {"id": "not_an_image", "prediction": "x"},
    ])
    out = tmp_path / "m.json"
    code, _, err = run(["--predictions", predictions, "--references", str(shared_dir / LEVIR_CC),
                        "--no-meteor", "--out", str(out)], capsys)
    assert code == 0
    matching = json.loads(out.read_text())["matching"]
    assert (matching["num_matched"], matching["num_extra"], matching["num_missing"]) == (3, 1, 1926)
    assert matching["extra_examples"] == ["not_an_image"]
    assert "1926 references have no prediction" in err


def test_predictions_named_by_their_images(shared_dir, tmp_path, capsys):
    """Records without an id field may name the pair by its before image (a path or ChangeChat's [A, B])."""
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"image": ["test/A/test_000001.png", "test/B/test_000001.png"], "answer": "the scene is the same as before"},
        {"image_A": "test/A/test_000002.png", "answer": "a road is built"},
        {"image": "C:\\levir\\test\\A\\test_000003.png", "answer": "there is no difference"},
    ])
    out = tmp_path / "m.json"
    code, _, _ = run(["--predictions", predictions, "--references", str(shared_dir / LEVIR_CC),
                      "--no-meteor", "--out", str(out)], capsys)
    assert code == 0
    assert json.loads(out.read_text())["matching"]["num_matched"] == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": ["a.png"], "answer": "x"}])
    code, _, err = run(["--predictions", bad, "--references", str(shared_dir / LEVIR_CC)], capsys)
    assert code == 2 and "'image' must be a path or the [before, after] pair" in err and err.count("\n") == 1


def test_no_matching_ids_is_an_error(shared_dir, tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "val_000001", "pred": "x"}])
    code, _, err = run(["--predictions", predictions, "--references", str(shared_dir / LEVIR_CC)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "no prediction id matches a reference id" in err


def test_empty_prediction_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(["--predictions", str(empty)], capsys)
    assert code == 2 and "is empty" in err and err.count("\n") == 1


def test_malformed_jsonl_line_is_named(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "pred": "x", "references": ["x"]}\n\n{"id": "b", "pred": oops}\n')
    code, _, err = run(["--predictions", str(path)], capsys)
    assert code == 2 and "line 3" in err and err.count("\n") == 1


def test_missing_fields_and_files(tmp_path, capsys):
    code, _, err = run(["--predictions", write_jsonl(tmp_path / "p.jsonl", [{"pred": "x"}])], capsys)
    assert code == 2 and "no id field" in err
    code, _, err = run(["--predictions", write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "pred": "x"}])], capsys)
    assert code == 2 and "carry no references" in err
    code, _, err = run(["--predictions", str(tmp_path / "absent.json")], capsys)
    assert code == 2 and "cannot read" in err
    assert main(["--task", "poetry", "--predictions", "x"]) == 2
    assert main(["--help"]) == 0


def test_changechat_caption_file(tmp_path, capsys):
    references = write_json(tmp_path / "refs.json", [
        {"image_A": "test/A/test_000001.png", "image_B": "test/B/test_000001.png",
         "captions": ["a road is built", "a new road appears"], "changeflag": 1},
        {"image_A": "test/A/test_000002.png", "image_B": "test/B/test_000002.png",
         "captions": ["there is no difference"], "changeflag": 0},
    ])
    predictions = write_json(tmp_path / "p.json", {"test_000001.png": "a road is built", "test_000002": "no change"})
    out = tmp_path / "m.json"
    code, printed, _ = run(["--predictions", predictions, "--references", references, "--no-meteor",
                            "--out", str(out)], capsys)
    assert code == 0 and "| changed | 1 |" in printed
    caption = json.loads(out.read_text())["tasks"]["caption"]
    assert caption["changed"]["BLEU-4"] == pytest.approx(100.0, abs=1e-5)
    assert caption["unchanged"]["num_samples"] == 1


def conversation(*turns):
    messages = []
    for question, answer in turns:
        messages += [{"from": "human", "value": "<image> <image> " + question}, {"from": "gpt", "value": answer}]
    return messages


def test_changechat_instruction_file_all_tasks(tmp_path, capsys):
    references = write_json(tmp_path / "instructions.json", [
        {"id": "b1", "image": ["A/1.png", "B/1.png"], "conversations": conversation((TASK_PROMPTS["binary"], "Yes."))},
        {"id": "b2", "image": ["A/2.png", "B/2.png"], "conversations": conversation((TASK_PROMPTS["binary"], "No."))},
        {"id": "c1", "image": ["A/1.png", "B/1.png"],
         "conversations": conversation((TASK_PROMPTS["count"], "There are 2 new roads and 3 new buildings."))},
        {"id": "l1", "image": ["A/1.png", "B/1.png"],
         "conversations": conversation((TASK_PROMPTS["localization"], "roads ['top-left'] buildings ['center-center']"))},
        {"id": "o1", "image": ["A/1.png", "B/1.png"],
         "conversations": conversation(("What replaced the trees?", "a road replaced the trees"))},
        {"id": "d1", "image": ["A/1.png", "B/1.png"], "conversations": conversation(
            (TASK_PROMPTS["binary"], "Yes."), (TASK_PROMPTS["count"], "1 road and 0 buildings"),
            (TASK_PROMPTS["dialogue_summary"], "a road is built"))},
    ])
    predictions = write_json(tmp_path / "p.json", [
        {"question_id": "b1", "answer": "yes"},
        {"question_id": "b2", "answer": "I cannot tell"},
        {"question_id": "c1", "answer": "two roads and one building"},
        {"question_id": "l1", "answer": "roads top-left buildings"},
        {"question_id": "o1", "answer": "a road replaced the trees"},
        {"question_id": "d1", "answer": ["yes", "one road and no buildings", "a road is built"]},
    ])
    out = tmp_path / "m.json"
    code, printed, _ = run(["--predictions", predictions, "--references", references, "--no-meteor",
                            "--out", str(out)], capsys)
    assert code == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["binary"]["num_unparsed"] == 1 and tasks["binary"]["accuracy"] == 50.0
    assert tasks["count"]["buildings"]["mae"] == 2.0 and tasks["count"]["roads"]["mae"] == 0.0
    assert tasks["localization"]["roads"]["exact_match"] == 100.0
    assert tasks["localization"]["buildings"]["recall"] == 0.0
    assert tasks["open"]["ROUGE-L"] == pytest.approx(100.0)
    assert tasks["dialogue"]["turns"]["2"]["count"]["roads"]["mae"] == 0.0
    assert tasks["dialogue"]["final_turn"]["BLEU-1"] == pytest.approx(100.0, abs=1e-5)
    for heading in ("### binary", "### count", "### localization", "### open", "### dialogue"):
        assert heading in printed

    code, _, _ = run(["--predictions", predictions, "--references", references, "--task", "binary",
                      "--no-meteor", "--out", str(out)], capsys)
    results = json.loads(out.read_text())
    assert code == 0 and list(results["tasks"]) == ["binary"]
    assert results["matching"]["num_skipped_other_tasks"] == 4


def test_deltavlm_eval_output_layout(tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "1", "task": "caption", "prediction": "a road is built", "references": ["a road is built", "new road"]},
        {"id": "2", "task": "binary", "prediction": "no", "references": ["Yes."]},
        {"id": "3", "task": "dialogue", "prediction": ["yes", "a road"],
         "references": ["Yes.", "a road is built"], "questions": [TASK_PROMPTS["binary"], "what changed?"]},
    ])
    out = tmp_path / "m.json"
    code, _, _ = run(["--predictions", predictions, "--no-meteor", "--out", str(out)], capsys)
    tasks = json.loads(out.read_text())["tasks"]
    assert code == 0
    assert tasks["binary"]["accuracy"] == 0.0 and tasks["binary"]["recall"] == 0.0
    assert tasks["caption"]["all"]["num_samples"] == 1
    assert set(tasks["dialogue"]["turns"]["2"]) == {"open"}


def test_unparseable_reference_is_counted(tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "1", "task": "binary", "prediction": "yes", "references": ["Yes."]},
        {"id": "2", "task": "binary", "prediction": "yes", "references": ["the weather is nice"]},
    ])
    out = tmp_path / "m.json"
    code, _, err = run(["--predictions", predictions, "--out", str(out)], capsys)
    binary = json.loads(out.read_text())["tasks"]["binary"]
    assert code == 0 and binary["num_unparsed_references"] == 1 and binary["num_samples"] == 1
    assert "cannot be parsed" in err


def test_missing_java_still_scores(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "pred": "a road", "references": ["a road"]}])
    out = tmp_path / "m.json"
    code, printed, _ = run(["--predictions", predictions, "--out", str(out)], capsys)
    caption = json.loads(out.read_text())["tasks"]["caption"]["all"]
    assert code == 0 and caption["METEOR"] is None and caption["ROUGE-L"] == pytest.approx(100.0)
    assert "java" in caption["meteor_error"] and "java" in printed


# --- prediction files other tools write, and files that disagree with the usual layout ---------------------------

def score_json(argv, capsys, tmp_path):
    out = tmp_path / "scores.json"
    code, printed, err = run([*argv, "--no-meteor", "--out", str(out)], capsys)
    assert code == 0, err
    return json.loads(out.read_text()), err


PARAPHRASED_BINARY = "Have these two images changed? Answer yes or no."


def test_a_binary_file_is_binary_however_its_question_is_worded(tmp_path, capsys):
    """The task of a ChangeChat file comes from its name, as `deltavlm eval` reads it; else --task says it."""
    items = [{"id": str(i), "image": [f"A/{i}.png", f"B/{i}.png"],
              "conversations": conversation((PARAPHRASED_BINARY, answer))} for i, answer in ((1, "Yes."), (2, "No."))]
    predictions = write_json(tmp_path / "p.json", [{"id": "1", "answer": "yes"}, {"id": "2", "answer": "yes"}])
    named = write_json(tmp_path / "mine_test_binary.json", items)
    results, _ = score_json(["--predictions", predictions, "--references", named], capsys, tmp_path)
    assert list(results["tasks"]) == ["binary"] and results["tasks"]["binary"]["accuracy"] == 50.0

    unnamed = write_json(tmp_path / "questions.json", items)
    results, _ = score_json(["--predictions", predictions, "--references", unnamed], capsys, tmp_path)
    assert list(results["tasks"]) == ["open"]  # nothing says otherwise: an open question
    results, _ = score_json(["--predictions", predictions, "--references", unnamed, "--task", "binary"],
                            capsys, tmp_path)
    assert results["tasks"]["binary"]["accuracy"] == 50.0


def test_ids_repeat_across_tasks_but_match_within_one(tmp_path, capsys):
    """`deltavlm eval` numbers each task's records from 1: binary "1" must not take caption "1"'s answer."""
    predictions = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "1", "task": "caption", "turn": 1, "prediction": "a road is built", "references": ["a road is built"]},
        {"id": "1", "task": "binary", "turn": 1, "prediction": "yes", "references": ["Yes."]},
    ])
    references = write_json(tmp_path / "x_test_binary.json", [
        {"id": "1", "image": ["A/1.png", "B/1.png"], "conversations": conversation((TASK_PROMPTS["binary"], "Yes."))}])
    results, _ = score_json(["--predictions", predictions, "--references", references], capsys, tmp_path)
    assert results["tasks"]["binary"]["accuracy"] == 100.0
    assert results["matching"]["num_extra"] == 1 and results["matching"]["extra_examples"] == ["1"]


def test_caption_file_pairs_are_matched_by_their_id_and_full_path(tmp_path, capsys):
    references = write_json(tmp_path / "refs.json", [
        {"id": "p1", "image_A": "val/A/0001.png", "image_B": "val/B/0001.png", "captions": ["a road is built"],
         "changeflag": 1},
        {"id": "p2", "image_A": "test/A/0001.png", "image_B": "test/B/0001.png", "captions": ["there is no difference"],
         "changeflag": -1},  # -1: not given; the no-change captions then decide
    ])
    by_id = write_json(tmp_path / "by_id.json", {"p1": "a road is built", "p2": "there is no difference"})
    results, _ = score_json(["--predictions", by_id, "--references", references], capsys, tmp_path)
    caption = results["tasks"]["caption"]
    assert caption["all"]["BLEU-4"] == pytest.approx(100.0, abs=1e-5) and results["matching"]["num_matched"] == 2
    assert caption["unchanged"]["num_samples"] == 1

    same_name = write_json(tmp_path / "by_path.json", {"test/A/0001.png": "there is no difference",
                                                        "val/A/0001.png": "a road is built"})
    results, _ = score_json(["--predictions", same_name, "--references", references], capsys, tmp_path)
    assert results["tasks"]["caption"]["all"]["BLEU-4"] == pytest.approx(100.0, abs=1e-5)


def test_an_unreadable_reference_turn_leaves_the_other_dialogues_scored(tmp_path, capsys):
    questions = [TASK_PROMPTS["binary"], TASK_PROMPTS["count"], TASK_PROMPTS["dialogue_summary"]]
    predictions = write_json(tmp_path / "p.json", [
        {"id": "d1", "prediction": ["yes", "1 road and no buildings", "a road"], "questions": questions,
         "references": ["Yes.", "1 road and 0 buildings", "a road"]},
        {"id": "d2", "prediction": ["yes", "2 roads", "roads"], "questions": questions,
         "references": ["Yes.", "some roads", "roads"]},  # "some roads" has no count
    ])
    results, err = score_json(["--predictions", predictions, "--task", "dialogue"], capsys, tmp_path)
    dialogue = results["tasks"]["dialogue"]
    assert dialogue["num_unparsed_references"] == 1 and dialogue["turns"]["2"]["count"]["num_samples"] == 1
    assert dialogue["turns"]["1"]["binary"]["num_samples"] == 2 and "cannot be parsed" in err


def test_an_interrupted_eval_run_scores_only_finished_records(tmp_path, capsys):
    questions = [TASK_PROMPTS["binary"], TASK_PROMPTS["dialogue_summary"]]

    def line(record_id, task, turn, prediction, reference, turns):
        return {"id": record_id, "task": task, "turn": turn, "turns": turns, "question": questions[turn - 1],
                "prediction": prediction, "references": [reference]}

    predictions = write_jsonl(tmp_path / "predictions.jsonl", [
        line("1", "dialogue", 1, "yes", "Yes.", 2), line("1", "dialogue", 2, "a road", "a road", 2),
        line("2", "dialogue", 1, "yes", "Yes.", 2),  # its closing turn was never generated
        line("1", "open", 1, "a road", "a house", 2), line("1", "open", 2, "a road", "a road", 2),  # the last turn counts
    ])
    results, err = score_json(["--predictions", predictions], capsys, tmp_path)
    assert results["tasks"]["dialogue"]["num_dialogues"] == 1
    assert results["tasks"]["dialogue"]["final_turn"]["BLEU-1"] == pytest.approx(100.0, abs=1e-5)
    assert results["tasks"]["open"]["BLEU-1"] == pytest.approx(100.0, abs=1e-5)
    assert results["matching"]["num_incomplete_predictions"] == 1 and "turns missing" in err


def test_eval_and_score_agree_on_a_several_round_record_of_a_single_task_file(tmp_path, capsys):
    references = write_json(tmp_path / "x_test_open.json", [{"id": "1", "image": ["A/1.png", "B/1.png"],
                            "conversations": conversation(("what is new?", "a house"), ("where?", "at the top"))}])
    predictions = write_jsonl(tmp_path / "predictions.jsonl", [
        {"id": "1", "task": "open", "turn": 1, "turns": 2, "prediction": "a house", "references": ["a house"]},
        {"id": "1", "task": "open", "turn": 2, "turns": 2, "prediction": "at the top", "references": ["at the top"]},
    ])
    inline, _ = score_json(["--predictions", predictions], capsys, tmp_path)
    against_file, _ = score_json(["--predictions", predictions, "--references", references], capsys, tmp_path)
    assert inline["tasks"]["open"]["BLEU-1"] == pytest.approx(100.0, abs=1e-5)
    assert against_file["tasks"] == inline["tasks"]


def test_deltavlm_predict_output_is_scored(tmp_path, capsys):
    references = write_json(tmp_path / "x_test_loc.json", [{"id": "test_000001.png", "image": ["A/1.png", "B/1.png"],
                            "conversations": conversation((TASK_PROMPTS["localization"], "roads ['top-left'] buildings []"))}])
    predictions = write_jsonl(tmp_path / "answers.jsonl", [
        {"id": "test_000001.png", "before": "A/1.png", "after": "B/1.png", "prompt": TASK_PROMPTS["localization"],
         "task": "localize", "answer": "roads ['top-left'] buildings []"}])
    results, _ = score_json(["--predictions", predictions, "--references", references], capsys, tmp_path)
    assert results["tasks"]["localization"]["roads"]["exact_match"] == 100.0


def test_odd_but_valid_prediction_files(tmp_path, capsys):
    references = write_json(tmp_path / "x_test_binary.json", [
        {"id": str(i), "image": [f"A/{i}.png", f"B/{i}.png"], "conversations": conversation((TASK_PROMPTS["binary"], a))}
        for i, a in ((1, "Yes."), (2, "No."))])
    booleans = write_json(tmp_path / "booleans.json", [{"id": "1", "answer": True}, {"id": "2", "answer": False}])
    results, _ = score_json(["--predictions", booleans, "--references", references], capsys, tmp_path)
    assert results["tasks"]["binary"]["accuracy"] == 100.0 and results["tasks"]["binary"]["num_unparsed"] == 0

    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_text('{"id": "1", "answer": "yes"}\n{"id": "2", "answer": "no"}\n', encoding="utf-8-sig")
    results, _ = score_json(["--predictions", str(with_bom), "--references", references], capsys, tmp_path)
    assert results["tasks"]["binary"]["accuracy"] == 100.0

    string_reference = write_jsonl(tmp_path / "turns.jsonl", [
        {"id": "1", "task": "binary", "turn": 1, "prediction": "yes", "references": "Yes."}])
    results, _ = score_json(["--predictions", string_reference], capsys, tmp_path)
    assert results["tasks"]["binary"]["accuracy"] == 100.0


def test_bad_fields_are_named(tmp_path, capsys):
    bad_questions = write_json(tmp_path / "q.json", [{"id": "1", "prediction": ["yes"], "questions": [1],
                                                       "references": ["Yes."]}])
    code, _, err = run(["--predictions", bad_questions], capsys)
    assert code == 2 and "'questions' must be a list of strings" in err and "record 1" in err

    predictions = write_json(tmp_path / "p.json", {"0001": "a road"})
    no_captions = write_json(tmp_path / "refs.json", [{"image_A": "A/0001.png", "image_B": "B/0001.png", "captions": []}])
    code, _, err = run(["--predictions", predictions, "--references", no_captions], capsys)
    assert code == 2 and "refs.json item 1" in err and "non-empty" in err
    bad_flag = write_json(tmp_path / "flag.json", [{"image_A": "A/0001.png", "image_B": "B/0001.png",
                                                    "captions": ["a road"], "changeflag": "yes"}])
    code, _, err = run(["--predictions", predictions, "--references", bad_flag], capsys)
    assert code == 2 and "'changeflag'" in err


def test_coco_protocol_tokenizes_with_the_ptb_tokenizer(shared_dir, tmp_path, capsys):
    """coco-caption's own tokenization: punctuation split off and dropped, where the standard protocol keeps
    "road," as one token. On the CCExpert file (LEVIR-CC references carry no punctuation) both agree."""
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "pred": "A road, built at the top.", "references": ["a road built at the top"]}])
    standard, _ = score_json(["--predictions", predictions], capsys, tmp_path)
    coco, _ = score_json(["--predictions", predictions, "--protocol", "coco"], capsys, tmp_path)
    assert standard["tasks"]["caption"]["all"]["BLEU-4"] < 100.0
    assert coco["tasks"]["caption"]["all"]["BLEU-4"] == pytest.approx(100.0, abs=1e-5)

    results, _ = score_json(["--predictions", str(shared_dir / CCEXPERT), "--protocol", "coco"], capsys, tmp_path)
    caption = results["tasks"]["caption"]["all"]
    for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert caption[metric] == pytest.approx(CCEXPERT_EXPECTED[metric], abs=0.01), metric


def test_coco_protocol_without_java_is_refused_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "pred": "a road", "references": ["a road"]}])
    code, _, err = run(["--predictions", predictions, "--protocol", "coco"], capsys)
    assert code == 2 and "--protocol coco" in err and "java" in err
