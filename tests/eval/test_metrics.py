"""Metric values checked by hand on small cases, the no-java path, and the published CCExpert-7b
LEVIR-CC scores reproduced through the Python API."""

import json
import math

import pytest

from eval.metrics import (
    CHANGECAP_MODULE,
    binary_metrics,
    caption_scores,
    caption_scores_by_change,
    count_metrics,
    localization_metrics,
    normalize_caption,
    score_dialogues,
    score_task,
    task_of_question,
)
from processing.conversation import TASK_PROMPTS

TEMPLATES = [
    "There is no difference.", "The two scenes seem identical.", "The scene is the same as before.",
    "No change has occurred.", "Almost nothing has changed.",
]
# DESIGN.md §5: CCExpert-7b on the LEVIR-CC test split under the standard protocol.
CCEXPERT_EXPECTED = {
    "BLEU-1": 86.65, "BLEU-2": 78.47, "BLEU-3": 71.31, "BLEU-4": 65.48,
    "METEOR": 41.82, "ROUGE-L": 76.54, "CIDEr": 143.28,
}


def test_normalize_caption_protocols():
    assert normalize_caption("The road, is built.  Why?") == "the road, is built why"
    # authors: predictions lose every ".", no lowercasing, single-space split (a double space is <unk>)
    assert normalize_caption("The road  is built.") == "the road is built"
    assert normalize_caption("The road  is built.", "authors") == "The road <unk> is built"
    assert normalize_caption(" there is no difference .", "authors", is_reference=True) == "there is no difference"
    with pytest.raises(ValueError, match="protocol"):
        normalize_caption("x", "sloppy")


def test_caption_hand_checked_single_reference():
    scores = caption_scores(["A b c d."], [["a b c e"]], meteor=False)
    # 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams match; equal lengths so no brevity penalty.
    assert scores["BLEU-1"] == pytest.approx(75.0, abs=1e-6)
    assert scores["BLEU-2"] == pytest.approx(100 * math.sqrt(3 / 4 * 2 / 3), abs=1e-6)
    assert scores["BLEU-3"] == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3), abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(75.0)  # LCS 3 of 4 both ways
    assert scores["CIDEr"] == 0.0  # a one-pair corpus: every n-gram has idf log(1) - log(1) = 0
    assert scores["METEOR"] is None and scores["meteor_error"] == "METEOR not requested"
    assert scores["num_samples"] == 1


def test_caption_empty_corpus_and_empty_prediction():
    empty = caption_scores([], [])
    assert empty["num_samples"] == 0 and all(empty[m] is None for m in CCEXPERT_EXPECTED)
    scores = caption_scores(["", "a road"], [["a road is built"], ["a road"]], meteor=False)
    assert 0 < scores["BLEU-1"] < 100 and scores["ROUGE-L"] == pytest.approx(50.0)  # (0 + 100) / 2
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores(["a"], ["a"])


def test_all_unchanged_subset():
    """Every unchanged LEVIR-CC pair has the same five references, so CIDEr-D's idf is 0 for all their
    n-grams: CIDEr is 0 on that subset however good the captions are, while BLEU is perfect."""
    predictions = ["the scene is the same as before"] * 3
    scores = score_task("caption", predictions, [TEMPLATES] * 3, meteor=False)
    assert scores["unchanged"]["num_samples"] == 3 and scores["changed"]["num_samples"] == 0
    assert scores["unchanged"]["BLEU-4"] == pytest.approx(100.0, abs=1e-5)
    assert scores["unchanged"]["CIDEr"] == 0.0
    assert scores["changed"]["BLEU-4"] is None
    assert scores["all"] == scores["unchanged"]


def test_changed_flags_pick_the_subsets():
    scores = caption_scores_by_change(["a", "b", "c"], [["a"], ["b"], ["x"]], [True, False, True], meteor=False)
    assert [scores[k]["num_samples"] for k in ("all", "changed", "unchanged")] == [3, 2, 1]


def test_meteor_missing_java_reports_null(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java on PATH
    scores = caption_scores(["a road is built"], [["a road is built"]])
    assert scores["METEOR"] is None
    assert "java" in scores["meteor_error"]
    assert scores["BLEU-1"] == pytest.approx(100.0, abs=1e-5) and scores["ROUGE-L"] == pytest.approx(100.0)


def test_meteor_hand_checked():
    scores = caption_scores(["a road is built", "new houses"], [["a road is built"], ["new houses"]])
    assert scores["METEOR"] == pytest.approx(100.0)


def test_binary_metrics_hand_checked():
    # decided: [T, F, T (unparsed on an unchanged pair = wrong), T] vs truth [T, T, F, F]
    scores = binary_metrics([True, False, None, True], [True, True, False, False])
    assert scores["num_unparsed"] == 1 and scores["num_samples"] == 4
    assert scores["accuracy"] == pytest.approx(25.0)
    assert scores["precision"] == pytest.approx(100 / 3)  # tp 1, fp 2
    assert scores["recall"] == pytest.approx(50.0)  # tp 1, fn 1
    assert scores["f1"] == pytest.approx(40.0)


def test_binary_metrics_no_positive_predictions():
    scores = binary_metrics([False, False], [False, False])
    assert scores["accuracy"] == 100.0 and scores["precision"] == 0.0 and scores["f1"] == 0.0


def test_count_metrics_hand_checked():
    scores = count_metrics(
        [{"roads": 1, "buildings": 2}, None],  # unparsed: wrong in each category (0 for the 2 roads, 1 for 0 buildings)
        [{"roads": 0, "buildings": 2}, {"roads": 2, "buildings": 0}],
    )
    assert scores["num_unparsed"] == 1
    assert scores["roads"]["mae"] == pytest.approx(1.5)  # errors 1, -2
    assert scores["roads"]["rmse"] == pytest.approx(math.sqrt(2.5))
    assert scores["buildings"]["mae"] == pytest.approx(0.5)  # errors 0, 1
    assert scores["buildings"]["rmse"] == pytest.approx(math.sqrt(0.5))


def test_unparsed_count_is_never_right():
    """"I cannot tell" on an unchanged pair is not a correct "0 / 0"."""
    scores = count_metrics([None], [{"roads": 0, "buildings": 0}])
    assert scores["roads"]["mae"] == 1.0 and scores["buildings"]["mae"] == 1.0
    assert score_task("count", ["I cannot tell"], ["No roads has changed, and no buildings has changed."])[
        "roads"]["mae"] == 1.0


def test_localization_metrics_hand_checked():
    scores = localization_metrics(
        [{"roads": ["top-left"], "buildings": []}, None, {"roads": [], "buildings": []}],
        [
            {"roads": ["top-left", "top-right"], "buildings": []},
            {"roads": [], "buildings": ["center-center"]},
            {"roads": [], "buildings": []},
        ],
    )
    roads, buildings = scores["roads"], scores["buildings"]
    assert scores["num_unparsed"] == 1
    # the unparsed answer gets all 9 labels of each category wrong: roads 1 + 9 wrong labels of 3 x 9
    assert roads["hamming_loss"] == pytest.approx(10 / 27)
    assert (roads["precision"], roads["recall"]) == (pytest.approx(10.0), pytest.approx(50.0))  # TP 1, FP 9, FN 1
    assert roads["jaccard"] == pytest.approx(100 * (0.5 + 0 + 1) / 3)  # empty vs empty = 1
    assert roads["exact_match"] == pytest.approx(100 / 3)
    assert buildings["hamming_loss"] == pytest.approx(9 / 27)
    assert buildings["precision"] == 0.0 and buildings["recall"] == 0.0
    assert buildings["jaccard"] == pytest.approx(200 / 3)


def test_unparsed_localization_is_never_right():
    scores = score_task("localization", ["I cannot tell"], ["roads [] buildings []"])
    assert scores["roads"]["exact_match"] == 0.0 and scores["roads"]["jaccard"] == 0.0
    assert scores["buildings"]["hamming_loss"] == 1.0


def test_score_task_parses_reference_answers():
    scores = score_task("binary", ["yes", "no change", "hmm"], ["Yes.", "No.", "Yes."])
    assert scores["accuracy"] == pytest.approx(200 / 3) and scores["num_unparsed"] == 1
    scores = score_task("count", ["2 roads and 1 building"], ["There are 2 new roads and 3 new buildings."])
    assert scores["buildings"]["mae"] == 2.0 and scores["roads"]["mae"] == 0.0
    scores = score_task("localization", ["roads top-left buildings"], ["roads ['top-left'] buildings []"])
    assert scores["roads"]["exact_match"] == 100.0
    with pytest.raises(ValueError, match="cannot be parsed"):
        score_task("binary", ["yes"], ["the weather"])


def test_task_of_question():
    assert task_of_question("<image> <image> " + TASK_PROMPTS["binary"]) == "binary"
    assert task_of_question(TASK_PROMPTS["count"].lower().replace("?", "")) == "count"
    assert task_of_question(TASK_PROMPTS["dialogue_summary"]) == "caption"
    assert task_of_question("What replaced the trees?") == "open"


def test_score_dialogues_per_turn_and_final():
    dialogue = {
        "questions": [TASK_PROMPTS["binary"], TASK_PROMPTS["count"], TASK_PROMPTS["dialogue_summary"]],
        "predictions": ["yes", "one road and no buildings", "a road is built"],
        "references": ["Yes.", "1 road and 0 buildings", "a new road is built"],
    }
    scores = score_dialogues([dialogue, dialogue], meteor=False)
    assert scores["num_dialogues"] == 2
    assert scores["turns"]["1"]["binary"]["accuracy"] == 100.0
    assert scores["turns"]["2"]["count"]["roads"]["mae"] == 0.0
    assert scores["turns"]["3"]["caption"]["num_samples"] == 2
    assert scores["final_turn"]["ROUGE-L"] == scores["turns"]["3"]["caption"]["ROUGE-L"]


def test_changecap_evaluate_module_loads_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(CHANGECAP_MODULE))
    scores = metric.compute(predictions=["A b c d."], references=[["a b c e"]], meteor=False)
    assert scores == caption_scores(["A b c d."], [["a b c e"]], meteor=False)


def _ccexpert(shared_dir):
    """The CCExpert prediction file, first record of each uid (as the published scores did)."""
    records = {}
    with open(shared_dir / "data/predictions/ccexpert_7b_levircc_test.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            records.setdefault(record["uid"], record)
    return list(records.values())


def test_ccexpert_own_references_match_levir_cc(shared_dir):
    """The file's own references are LEVIR-CC's test references (same pairs, same sentences after
    normalisation), so scoring against either gives the same numbers (checked in test_score.py)."""
    records = _ccexpert(shared_dir)
    images = json.loads((shared_dir / "data/levir_cc/LevirCCcaptions.json").read_text())["images"]
    test = {image["imgid"]: image for image in images if image["split"] == "test"}
    assert len(records) == len(test) == 1929
    for record in records:
        image = test[int(record["uid"].rsplit("img", 1)[1])]
        assert [normalize_caption(r) for r in record["change_caption"]] == [" ".join(s["tokens"]) for s in image["sentences"]]


def test_ccexpert_reproduces_published_scores(shared_dir):
    records = _ccexpert(shared_dir)
    scores = caption_scores([r["pred"] for r in records], [r["change_caption"] for r in records])
    assert scores["num_samples"] == 1929
    for metric, expected in CCEXPERT_EXPECTED.items():
        assert scores[metric] == pytest.approx(expected, abs=0.01), metric


def test_ptb_tokenize_keeps_one_line_per_text():
    from eval.metrics import ptb_tokenize

    texts = ["A new road, built in the top-left.", "", "the building's roof\nis new", "..."]
    assert ptb_tokenize(texts) == ["a new road built in the top-left", "", "the building 's roof is new", ""]
    assert ptb_tokenize([]) == []
