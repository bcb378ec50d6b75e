"""Scores for the six ChangeChat tasks, from answer texts and references (no model involved).

Captions use the coco-caption scorers of `pycocoevalcap` (BLEU-1..4, METEOR 1.5, ROUGE-L,
CIDEr-D); the other tasks parse answers with `eval.parsers` and compute plain classification /
regression metrics. Every entry point returns a JSON-ready dict; all caption scores are ×100.

About pycocoevalcap's `Cider`: it is CIDEr-D as defined by Vedantam et al. (the coco-caption
variant): n-grams 1-4 without stemming, the candidate's tf-idf clipped by the reference's,
a Gaussian length penalty (sigma 6), ×10, and document frequencies taken from the references
of the corpus being scored (so the score of a subset uses that subset's idf, and a corpus of one
pair always scores 0).
"""

import math
import shutil
from contextlib import contextmanager
from pathlib import Path

from processing.conversation import GRID_CELLS, task_of_question  # noqa: F401  (re-exported)

from eval.parsers import CATEGORIES, parse_binary, parse_count, parse_localization

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
PROTOCOLS = ("standard", "authors", "coco")
TASKS = ("caption", "binary", "count", "localization", "open", "dialogue")

# LEVIR-CC gives every unchanged pair these five sentences (normalised with the standard protocol).
NO_CHANGE_TEMPLATES = frozenset({
    "there is no difference",
    "the two scenes seem identical",
    "the scene is the same as before",
    "no change has occurred",
    "almost nothing has changed",
})
# The caption metrics as a local `evaluate` module: evaluate.load(str(CHANGECAP_MODULE)).
CHANGECAP_MODULE = Path(__file__).resolve().parent / "metric_modules" / "changecap"
# What the authors' word map turned every unknown or empty token into (see normalize_caption).
UNKNOWN_TOKEN = "<unk>"


# ---------------------------------------------------------------------------------------------
# caption normalisation

def normalize_caption(text: str, protocol: str = "standard", is_reference: bool = False) -> str:
    """One caption -> the space-separated token string the coco-caption scorers read.

    standard (DESIGN.md §5, the protocol of the published reference numbers): lowercase, `.` and
    `?` replaced by spaces, split on whitespace.
    authors (the DeltaVLM authors' notebooks): references lose " ." and surrounding blanks,
    predictions lose every "."; neither is lowercased; both are split on single spaces. Their
    notebooks then mapped words through a LEVIR-CC word map and scored the integer ids; we keep the
    words (the word map is not part of this project) but reproduce the one effect of that step we
    can without it: an empty token from a double space, or a token holding a newline/tab, becomes
    `<unk>` as it did there. Not reproduced: other out-of-vocabulary words also became `<unk>`
    (so two different rare words matched each other), and METEOR on ids did exact matching only
    (no stems, synonyms or paraphrases).
    coco (coco-caption's own tokenization, which neither the published LEVIR-CC numbers nor the
    authors used): the Stanford PTB tokenizer that pycocoevalcap bundles, lowercased, punctuation
    tokens dropped ("road," -> "road", "building's" -> "building 's"); needs java. Scoring
    tokenizes a whole corpus in one call (`ptb_tokenize`).
    """
    text = str(text)
    if protocol == "coco":
        return ptb_tokenize([text])[0]
    if protocol == "standard":
        return " ".join(text.lower().replace(".", " ").replace("?", " ").split())
    if protocol == "authors":
        text = text.replace(" .", "").strip() if is_reference else text.replace(".", "")
        return " ".join(UNKNOWN_TOKEN if (not t or any(c.isspace() for c in t)) else t for t in text.split(" "))
    raise ValueError(f"unknown caption protocol {protocol!r}; expected one of {PROTOCOLS}")


def ptb_tokenize(texts: list[str]) -> list[str]:
    """coco-caption's tokenization of each text: one run of the Stanford PTBTokenizer jar that pycocoevalcap
    bundles (-preserveLines -lowerCase, fed on stdin: pycocoevalcap's own wrapper writes a temporary file
    into its install folder, which fails where site-packages is read-only), then its punctuation tokens
    dropped as pycocoevalcap drops them. Raises RuntimeError when java is missing or the jar fails."""
    import subprocess

    from pycocoevalcap.tokenizer import ptbtokenizer

    if not java_available():
        raise RuntimeError("the coco protocol runs the Stanford PTB tokenizer and needs `java` on PATH "
                           "(install a Java runtime, e.g. apt-get install default-jre-headless)")
    if not texts:
        return []
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    lines = "\n".join(" ".join(str(text).split()) for text in texts)  # one line per text, whatever it holds
    done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                           "-lowerCase"], input=lines.encode("utf-8"), capture_output=True, check=False)
    output = done.stdout.decode("utf-8").split("\n")
    if done.returncode != 0 or len(output) < len(texts):
        raise RuntimeError(f"the PTB tokenizer failed (exit {done.returncode}): {done.stderr.decode()[-300:]}")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(token for token in line.split() if token not in punctuation) for line in output[: len(texts)]]


def is_no_change_caption_set(references: list[str]) -> bool:
    """True when every reference is a LEVIR-CC no-change template sentence (an unchanged pair)."""
    normalised = [normalize_caption(r) for r in references]
    return bool(normalised) and all(r in NO_CHANGE_TEMPLATES for r in normalised)


# ---------------------------------------------------------------------------------------------
# caption metrics

def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(predictions: list[str], references: list[list[str]], protocol: str = "standard",
                   meteor: bool = True) -> dict:
    """Corpus-level caption metrics ×100.

    predictions: one caption per pair; references: the reference captions of each pair (any
    number ≥ 1). Returns {"num_samples": int, "BLEU-1", ..., "CIDEr": float}; METEOR is None (and
    "meteor_error" says why) when `meteor` is False, java is not installed or the jar fails.
    All metrics are None for an empty corpus.
    """
    with _meteor_session(meteor) as meteor_score:
        return _caption_scores(predictions, references, protocol, meteor_score)


def caption_scores_by_change(predictions: list[str], references: list[list[str]], changed: list[bool],
                             protocol: str = "standard", meteor: bool = True) -> dict:
    """Caption metrics on all pairs and on the changed / unchanged subsets.

    changed: one flag per pair (True = the pair changed). Returns {"all": scores, "changed":
    scores, "unchanged": scores}, each as `caption_scores` returns it (all None for an empty subset).
    """
    if len(changed) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(changed)} changed flags")
    subsets = {"all": [True] * len(predictions), "changed": list(changed), "unchanged": [not c for c in changed]}
    with _meteor_session(meteor) as meteor_score:  # one JVM for the three corpora: it takes ~5 s to start
        return {
            name: _caption_scores(
                [p for p, keep in zip(predictions, mask) if keep],
                [r for r, keep in zip(references, mask) if keep],
                protocol,
                meteor_score,
            )
            for name, mask in subsets.items()
        }


def _caption_scores(predictions, references, protocol, meteor_score) -> dict:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    result = {"num_samples": len(predictions)}
    if not predictions:
        result.update(dict.fromkeys(CAPTION_METRICS))
        return result
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")

    if protocol == "coco":  # one tokenizer run for the whole corpus
        tokens = iter(ptb_tokenize([*predictions, *(r for refs in references for r in refs)]))
        candidates = {i: [next(tokens)] for i in range(len(predictions))}
        gold = {i: [next(tokens) for _ in refs] for i, refs in enumerate(references)}
    else:
        candidates = {i: [normalize_caption(p, protocol)] for i, p in enumerate(predictions)}
        gold = {i: [normalize_caption(r, protocol, is_reference=True) for r in refs]
                for i, refs in enumerate(references)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gold, candidates, verbose=0)
    for n, value in enumerate(bleu, start=1):
        result[f"BLEU-{n}"] = 100 * float(value)
    result["METEOR"], error = meteor_score(gold, candidates)
    result["ROUGE-L"] = 100 * float(Rouge().compute_score(gold, candidates)[0])
    result["CIDEr"] = 100 * float(Cider().compute_score(gold, candidates)[0])
    if error:
        result["meteor_error"] = error
    return result


@contextmanager
def _meteor_session(enabled: bool):
    """Yields score(gold, candidates) -> (METEOR ×100 or None, reason or None), backed by one JVM
    running the METEOR 1.5 jar that pycocoevalcap bundles; the JVM stops when the block ends."""
    if not enabled:
        yield lambda gold, candidates: (None, "METEOR not requested")
        return
    if not java_available():
        reason = ("METEOR skipped: `java` not found on PATH "
                  "(install a Java runtime, e.g. apt-get install default-jre-headless)")
        yield lambda gold, candidates: (None, reason)
        return
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()

    def score(gold, candidates):
        try:
            return 100 * float(scorer.compute_score(gold, candidates)[0]), None
        except (OSError, ValueError) as error:  # the JVM died: readline() gave no number
            if scorer.lock.locked():  # compute_score leaves it held on failure; __del__ would hang on it
                scorer.lock.release()
            return None, f"METEOR failed: {error or 'the METEOR jar stopped answering'}"

    try:
        yield score
    finally:
        # Stop the JVM now instead of at garbage collection (__del__ twice is harmless).
        scorer.__del__()
        scorer.meteor_p.stdout.close()
        scorer.meteor_p.stderr.close()


# ---------------------------------------------------------------------------------------------
# binary

def binary_metrics(predictions: list[bool | None], references: list[bool]) -> dict:
    """Accuracy, precision, recall, F1 (×100) with "changed" (True) as the positive class.

    predictions: parsed answers, None where unparsed. An unparsed answer counts as wrong: as a
    false negative on a changed pair and a false positive on an unchanged one. Precision/recall/F1
    are 0 when their denominator is 0.
    """
    _check_lengths(predictions, references)
    unparsed = sum(p is None for p in predictions)
    # Unparsed -> the opposite of the truth, so it lands in FN or FP.
    decided = [(not truth) if pred is None else pred for pred, truth in zip(predictions, references)]
    tp = sum(p and t for p, t in zip(decided, references))
    fp = sum(p and not t for p, t in zip(decided, references))
    fn = sum((not p) and t for p, t in zip(decided, references))
    correct = sum(p == t for p, t in zip(decided, references))
    precision, recall, f1 = _precision_recall_f1(tp, fp, fn)
    return {
        "num_samples": len(references),
        "num_unparsed": unparsed,
        "accuracy": _percent(correct, len(references)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def _precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = _percent(tp, tp + fp) or 0.0
    recall = _percent(tp, tp + fn) or 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _percent(numerator: float, denominator: float) -> float | None:
    return 100.0 * numerator / denominator if denominator else None


def _check_lengths(predictions: list, references: list) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


# ---------------------------------------------------------------------------------------------
# count

def count_metrics(predictions: list[dict | None], references: list[dict]) -> dict:
    """MAE and RMSE of the road and building counts, each category separately.

    predictions / references: {"roads": int, "buildings": int}; a prediction of None (unparsed)
    counts as wrong in each category, by the least a wrong count can miss: 0 where the truth is
    above 0 (an error of the true count), 1 where it is 0. (Reading it as "no change" would score
    "I cannot tell" as right on every unchanged pair.) Returns {"num_samples", "num_unparsed",
    "roads": {"mae", "rmse"}, "buildings": {"mae", "rmse"}}; MAE/RMSE are None for an empty set.
    """
    _check_lengths(predictions, references)
    result = {"num_samples": len(references), "num_unparsed": sum(p is None for p in predictions)}
    for category in CATEGORIES:
        errors = [_count_of(p, r, category) - r[category] for p, r in zip(predictions, references)]
        result[category] = {
            "mae": sum(abs(e) for e in errors) / len(errors) if errors else None,
            "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None,
        }
    return result


def _count_of(prediction: dict | None, reference: dict, category: str) -> int:
    if prediction is None:  # unparsed: wrong by one at least
        return 0 if reference[category] > 0 else 1
    return prediction.get(category, 0)


# ---------------------------------------------------------------------------------------------
# localization

def localization_metrics(predictions: list[dict | None], references: list[dict]) -> dict:
    """Multi-label 3x3-grid metrics per category, over the 9 cells of GRID_CELLS.

    predictions / references: {"roads": [cells], "buildings": [cells]}; a prediction of None
    (unparsed) gets every one of its 9 labels wrong (the complement of the truth), as binary counts
    an unparsed answer as the opposite of the truth. Per category: hamming_loss (fraction of the N×9 labels
    that differ), micro precision/recall/F1, sample-averaged Jaccard (a pair where both sets are
    empty scores 1, the answer is right), exact_match (both 9-label rows equal). All ×100 except
    the Hamming loss, which is a fraction in [0, 1].
    """
    _check_lengths(predictions, references)
    result = {"num_samples": len(references), "num_unparsed": sum(p is None for p in predictions)}
    for category in CATEGORIES:
        truth = [set(r[category]) for r in references]
        predicted = [set(GRID_CELLS) - t if p is None else set(p.get(category, [])) for p, t in zip(predictions, truth)]
        result[category] = _multilabel_scores(predicted, truth)
    return result


def _multilabel_scores(predicted: list[set], truth: list[set]) -> dict:
    unknown = set().union(*predicted, *truth) - set(GRID_CELLS)
    if unknown:
        raise ValueError(f"unknown grid cells {sorted(unknown)}; expected cells of {GRID_CELLS}")
    n = len(truth)
    tp = sum(len(p & t) for p, t in zip(predicted, truth))
    fp = sum(len(p - t) for p, t in zip(predicted, truth))
    fn = sum(len(t - p) for p, t in zip(predicted, truth))
    precision, recall, f1 = _precision_recall_f1(tp, fp, fn)
    jaccard = [len(p & t) / len(p | t) if (p | t) else 1.0 for p, t in zip(predicted, truth)]
    return {
        "hamming_loss": (fp + fn) / (n * len(GRID_CELLS)) if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "jaccard": _percent(sum(jaccard), n),
        "exact_match": _percent(sum(p == t for p, t in zip(predicted, truth)), n),
    }


# ---------------------------------------------------------------------------------------------
# one entry for every task

_PARSERS = {"binary": parse_binary, "count": parse_count, "localization": parse_localization}


def parse_answer(task: str, text):
    """Parse one answer (or pass through an already parsed label) for binary/count/localization."""
    if task == "binary" and isinstance(text, bool):
        return text
    if task in ("count", "localization") and isinstance(text, dict):
        return text
    return _PARSERS[task](text)


def score_task(task: str, predictions: list[str], references: list, protocol: str = "standard",
               changed: list[bool] | None = None, meteor: bool = True) -> dict:
    """Score one task. predictions: answer texts. references, by task:

    caption: list of reference captions per pair (subset scores "changed"/"unchanged" come from
    `changed`, or, when it is None, from the LEVIR-CC no-change templates); open: one reference
    answer (str) or a list per pair, scored with the caption metrics; binary / count /
    localization: the reference answer text or its parsed label (bool / dict).
    Reference answers that do not parse raise ValueError. Dialogues: see `score_dialogues`.
    """
    if task == "caption":
        references = [_as_list(r) for r in references]
        if changed is None:
            changed = [not is_no_change_caption_set(r) for r in references]
        return caption_scores_by_change(predictions, references, changed, protocol=protocol, meteor=meteor)
    if task == "open":
        return caption_scores(predictions, [_as_list(r) for r in references], protocol=protocol, meteor=meteor)
    if task not in _PARSERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    gold = []
    for i, reference in enumerate(references):
        label = parse_answer(task, reference)
        if label is None:
            raise ValueError(f"{task} reference {i} cannot be parsed: {reference!r}")
        gold.append(label)
    parsed = [parse_answer(task, p) for p in predictions]
    metric = {"binary": binary_metrics, "count": count_metrics, "localization": localization_metrics}[task]
    return metric(parsed, gold)


def _as_list(reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


# ---------------------------------------------------------------------------------------------
# dialogue

def score_dialogues(dialogues: list[dict], protocol: str = "standard", meteor: bool = True) -> dict:
    """Per-turn and final-turn scores of multi-turn dialogues.

    dialogues: [{"questions": [str], "predictions": [str], "references": [str]}], one entry per
    dialogue, turns in order. Each turn is scored with the metric of the task its question asks
    for (`task_of_question`; unrecognised questions are open QA). Returns {"num_dialogues",
    "turns": {"1": {task: scores}, "2": ...}, "final_turn": caption scores of every dialogue's last
    answer against its last reference, "num_unparsed_references": binary / count / localization turns whose
    reference answer cannot be parsed, left out of their turn's scores}.
    """
    groups: dict[tuple[int, str], tuple[list, list]] = {}
    unparsed_references = 0
    for n, dialogue in enumerate(dialogues):
        questions, predictions, references = dialogue["questions"], dialogue["predictions"], dialogue["references"]
        if not (len(questions) == len(predictions) == len(references)) or not questions:
            raise ValueError(
                f"dialogue {n}: {len(questions)} questions, {len(predictions)} predictions, "
                f"{len(references)} references; expected the same non-zero number"
            )
        for turn, (question, prediction, reference) in enumerate(zip(questions, predictions, references), start=1):
            task = task_of_question(question)
            if task in _PARSERS and parse_answer(task, reference) is None:
                unparsed_references += 1  # as for single-turn records: left out of its turn's scores, counted
                continue
            preds, refs = groups.setdefault((turn, task), ([], []))
            preds.append(prediction)
            refs.append(reference)
    turns: dict[str, dict] = {}
    for (turn, task), (preds, refs) in sorted(groups.items()):
        scores = score_task(task, preds, refs, protocol=protocol, meteor=meteor)
        turns.setdefault(str(turn), {})[task] = scores["all"] if task == "caption" else scores
    final = caption_scores(
        [d["predictions"][-1] for d in dialogues],
        [_as_list(d["references"][-1]) for d in dialogues],
        protocol=protocol,
        meteor=meteor,
    )
    return {"num_dialogues": len(dialogues), "num_unparsed_references": unparsed_references, "turns": turns,
            "final_turn": final}


__all__ = [
    "CAPTION_METRICS",
    "CHANGECAP_MODULE",
    "NO_CHANGE_TEMPLATES",
    "PROTOCOLS",
    "TASKS",
    "binary_metrics",
    "caption_scores",
    "caption_scores_by_change",
    "count_metrics",
    "is_no_change_caption_set",
    "java_available",
    "localization_metrics",
    "normalize_caption",
    "parse_answer",
    "ptb_tokenize",
    "score_dialogues",
    "score_task",
    "task_of_question",
]
