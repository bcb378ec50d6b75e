"""`deltavlm score`: score a prediction file against references, no model needed.

    deltavlm score --predictions P [--references R] [--task caption|binary|count|localization|open|dialogue]
                   [--protocol standard|authors|coco] [--split test] [--out metrics.json] [--no-meteor]

Prediction files (JSON list / JSON object / JSONL, one record per line):
- CCExpert layout: {"uid": "Levir_CC_test_img<imgid>", "pred": str, "change_caption": [refs]};
- simple lists: {"id" | "uid" | "image_id" | "question_id" | "filename": ..., "prediction" | "pred" |
  "caption" | "answer" | "text": str}, or one JSON object mapping id -> prediction text; a record with
  none of those id fields may name its pair by image instead: "image_A" or "image" (a path, or the
  ChangeChat [before, after] pair, whose before path is used);
- DeltaVLM's eval output: one object per line {"id": str, "task": one of TASKS, "prediction": str
  (dialogue: the list of per-turn answers), "references": [str] (caption: every reference caption;
  binary/count/localization/open: [the reference answer]; dialogue: the per-turn reference
  answers), "questions": [str] (dialogue only), "changed": bool (captions, optional)}.
A record's references are used when --references is not given. Of records with the same id only
the first is kept (the CCExpert file repeats 7 uids); the duplicates are counted. "task" may also be
written "localize"/"loc", "dialog", or "free" (`deltavlm predict`: the reference decides). Per-turn lines
(`deltavlm eval`: "turn", and "turns" = the record's number of turns) are regrouped: a dialogue's turns into
one record, any other task's record to its last turn; a record with turns missing is left out and counted.

Reference files: LEVIR-CC `LevirCCcaptions.json` ({"images": [...]}, only --split, default test,
is used), a ChangeChat caption file ([{image_A, image_B, captions, changeflag, optional id}]) or a
ChangeChat instruction file ([{"id", "image": [A, B], "conversations": [...]}]; the task its file name
ends in, `_binary` etc., else one round = the task its question asks for, several rounds = a dialogue).

Id matching: every reference registers a few aliases and a prediction matches the first alias its
id equals, as written, as a file name without folders, or without its extension. LEVIR-CC pair:
`Levir_CC_<split>_img<imgid>`, the file name `test_000123.png` / `test_000123`, and the imgid
("8148"; a bare number is the imgid, never the file number). ChangeChat caption pair: image_A's
path, file name and stem, and its "id" where it has one. ChangeChat instruction item: its "id". A
prediction that names its task matches a reference of that task (ids repeat across tasks). Unmatched ids
on either side are counted and reported; the intersection is scored, and an empty intersection is an error.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from processing.changechat_data import task_from_file_name
from processing.conversation import conversation_to_rounds

from eval.metrics import (
    CAPTION_METRICS,
    PROTOCOLS,
    TASKS,
    binary_metrics,
    caption_scores,
    caption_scores_by_change,
    count_metrics,
    is_no_change_caption_set,
    java_available,
    localization_metrics,
    parse_answer,
    score_dialogues,
    task_of_question,
)
from eval.parsers import CATEGORIES

ID_KEYS = ("id", "uid", "image_id", "question_id", "filename")
IMAGE_ID_KEYS = ("image_A", "image")  # used only when no ID_KEYS field is there: the pair named by its before image
TEXT_KEYS = ("prediction", "pred", "caption", "answer", "text", "generated")
REFERENCE_KEYS = ("references", "change_caption", "reference", "captions")
LIST_KEYS = ("predictions", "results", "annotations", "data")  # JSON objects that wrap the record list
# Other names of the tasks in prediction files: `deltavlm predict` writes "localize" and "free" (a free prompt: the
# reference says what it is), ChangeChat file names "loc" and "dialog".
TASK_ALIASES = {"localize": "localization", "loc": "localization", "dialog": "dialogue", "free": None}
EXAMPLES_SHOWN = 5


class ScoreError(ValueError):
    """Bad input: the message is printed as the command's one error line."""


@dataclass
class Reference:
    """The gold side of one sample.

    answers: caption -> the reference captions; binary/count/localization/open -> [the answer];
    dialogue -> the answer of each turn. questions: dialogue only. changed: the pair's changeflag
    where the source has one.
    """

    id: str
    task: str | None
    answers: list
    questions: list | None = None
    changed: bool | None = None
    aliases: tuple = ()


@dataclass
class Prediction:
    id: str
    text: str | list
    task: str | None = None
    references: list | None = None
    questions: list | None = None
    changed: bool | None = None


# ---------------------------------------------------------------------------------------------
# reading files

def read_records(path: str | Path, what: str = "file") -> list | dict:
    """Parse a JSON or JSONL file. A `.jsonl` file, or one that holds several JSON values, is
    read line by line (blank lines skipped). Raises ScoreError naming the line of a syntax error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not an error
    except OSError as error:
        raise ScoreError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ScoreError(f"{what} {path} is not UTF-8 text (byte {error.start}): expected JSON or JSONL") from None
    if not text.strip():
        raise ScoreError(f"{what} {path} is empty")
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            if not error.msg.startswith("Extra data"):  # a single broken JSON document
                raise ScoreError(f"{what} {path} line {error.lineno}: invalid JSON ({error.msg})") from None
        except RecursionError:
            raise ScoreError(f"{what} {path}: JSON nested too deeply to read") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ScoreError(f"{what} {path} line {number}: invalid JSON ({error.msg})") from None
            except RecursionError:
                raise ScoreError(f"{what} {path} line {number}: JSON nested too deeply to read") from None
    return records


def id_aliases(value) -> list[str]:
    """The strings an id can be matched by: as written, without folders, without extension."""
    text = str(value).strip()
    name = PureWindowsPath(text).name  # handles both / and \\ separators
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return list(dict.fromkeys([text, name, stem]))


def load_predictions(path: str | Path) -> tuple[list[Prediction], int, list[str]]:
    """Prediction records of a file -> (predictions with unique ids, number of duplicates dropped, ids of
    records whose per-turn lines are incomplete and left out)."""
    data = read_records(path, "prediction file")
    records, incomplete = _merge_turn_lines(_record_list(data))
    if not records:
        raise ScoreError(f"prediction file {path} holds no complete predictions"
                         + (f" ({len(incomplete)} with turns missing, e.g. {incomplete[0]!r})" if incomplete else ""))
    predictions, seen, duplicates = [], set(), 0
    for number, record in enumerate(records, start=1):
        prediction = _prediction_from_record(record, number, path)
        key = (prediction.task, prediction.id)  # ids are unique within a task file, not across task files
        if key in seen:
            duplicates += 1  # keep the first, as the published CCExpert scores did
            continue
        seen.add(key)
        predictions.append(prediction)
    return predictions, duplicates, incomplete


def _merge_turn_lines(records: list) -> tuple[list, list[str]]:
    """`deltavlm eval` writes one line per model call (`turn` 1, 2, ...). A dialogue's turns become one record
    with a list of predictions, per-turn references and questions, in turn order; any other task is scored on
    its last turn, as `deltavlm eval` scores it. Records whose turns are not all there (a line's `turns` gives
    their number; without it, a gap in 1..last) are left out: scoring an interrupted run's last line as the
    final turn would score the wrong answer. Returns (records, ids of the incomplete ones)."""
    if not any(isinstance(record, dict) and "turn" in record for record in records):
        return records, []
    groups: dict[tuple, list] = {}
    for record in records:
        if not isinstance(record, dict) or "turn" not in record:
            groups[("", id(record))] = [record]
            continue
        if not isinstance(record["turn"], int) or isinstance(record["turn"], bool) or "id" not in record:
            raise ScoreError(f"prediction record {record.get('id', '(no id)')!r}: a per-turn line needs an 'id' and "
                             f"an integer 'turn', got turn {record['turn']!r}")
        groups.setdefault((record.get("task"), str(record.get("id"))), []).append(record)
    merged, incomplete = [], []
    for turns in groups.values():
        first = turns[0]
        if "turn" not in first:
            merged.extend(turns)
            continue
        by_turn = {}
        for line in turns:
            by_turn.setdefault(int(line["turn"]), line)  # a resumed run may repeat a turn: keep the first
        expected = first.get("turns")
        last = expected if isinstance(expected, int) and not isinstance(expected, bool) else max(by_turn)
        if sorted(by_turn) != list(range(1, last + 1)):
            incomplete.append(str(first["id"]))
            continue
        ordered = [by_turn[number] for number in sorted(by_turn)]
        if TASK_ALIASES.get(first.get("task"), first.get("task")) != "dialogue":
            merged.append(ordered[-1])
            continue
        merged.append({
            "id": first["id"],
            "task": "dialogue",
            "prediction": [line.get("prediction", "") for line in ordered],
            "references": [_turn_reference(line) for line in ordered],
            "questions": [line.get("question", "") for line in ordered],
        })
    return merged, incomplete


def _turn_reference(line: dict) -> str:
    """A per-turn line's reference answer: `references` holds [the answer] (or the answer as a string)."""
    references = line.get("references")
    if isinstance(references, str):
        return references
    if isinstance(references, list) and references and isinstance(references[0], str):
        return references[0]
    if references in (None, []):
        return ""
    raise ScoreError(f"prediction record {line.get('id')!r} turn {line.get('turn')}: 'references' must be a string "
                     f"or a list of strings, got {references!r}")


def _record_list(data) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in LIST_KEYS:
            if isinstance(data.get(key), list):
                return data[key]
        if _first_key(data, TEXT_KEYS) is not None:
            return [data]  # a single record
        if data and all(isinstance(v, str) for v in data.values()):
            return [{"id": key, "prediction": value} for key, value in data.items()]
    raise ScoreError("prediction file: expected a list of records, JSONL, or an object mapping ids to predictions")


def _first_key(record: dict, keys: tuple) -> str | None:
    return next((key for key in keys if key in record), None)


def _prediction_from_record(record, number: int, path) -> Prediction:
    where = f"prediction file {path} record {number}"
    if not isinstance(record, dict):
        raise ScoreError(f"{where}: expected a JSON object, got {type(record).__name__}")
    id_key, text_key = _first_key(record, ID_KEYS + IMAGE_ID_KEYS), _first_key(record, TEXT_KEYS)
    if id_key is None:
        raise ScoreError(f"{where}: no id field (one of {', '.join(ID_KEYS + IMAGE_ID_KEYS)})")
    if text_key is None:
        raise ScoreError(f"{where}: no prediction field (one of {', '.join(TEXT_KEYS)})")
    record_id = record[id_key]
    if id_key == "image" and isinstance(record_id, list):
        if len(record_id) != 2 or not all(isinstance(path, str) for path in record_id):
            raise ScoreError(f"{where}: 'image' must be a path or the [before, after] pair of paths, got {record_id!r}")
        record_id = record_id[0]  # references register the before image's path, name and stem
    if record_id is None or isinstance(record_id, (list, dict)):
        raise ScoreError(f"{where}: {id_key!r} must be a string or a number, got {record_id!r}")
    if isinstance(record[text_key], dict):
        raise ScoreError(f"{where}: {text_key!r} must be text (or a list of per-turn answers), got an object")
    ref_key = _first_key(record, REFERENCE_KEYS)
    references = record.get(ref_key) if ref_key else None
    if isinstance(references, str):
        references = [references]
    if references is not None and not (isinstance(references, list) and all(isinstance(r, str) for r in references)):
        raise ScoreError(f"{where}: {ref_key!r} must be a string or a list of strings, got {references!r}")
    task = record.get("task")
    task = TASK_ALIASES.get(task, task) if isinstance(task, str) else task
    if task is not None and task not in TASKS:
        raise ScoreError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)} (or "
                         f"{', '.join(name for name in TASK_ALIASES)})")
    questions = record.get("questions")
    if questions is not None and not (isinstance(questions, list) and all(isinstance(q, str) for q in questions)):
        raise ScoreError(f"{where}: 'questions' must be a list of strings, got {questions!r}")
    changed = record.get("changed", record.get("changeflag"))
    if changed is not None and changed not in (True, False, 0, 1, -1):
        raise ScoreError(f"{where}: 'changed' must be true/false (or a changeflag 0/1), got {changed!r}")
    changed = None if changed == -1 else changed
    return Prediction(
        id=str(record_id),
        # JSON false is the answer "False" (read as "no"), not an empty one; null is empty
        text=record[text_key] if isinstance(record[text_key], list) else ("" if record[text_key] is None
                                                                          else str(record[text_key])),
        task=task,
        references=references,
        questions=questions,
        changed=None if changed is None else bool(changed),
    )


def load_references(path: str | Path, split: str = "test", task: str | None = None) -> list[Reference]:
    """A LEVIR-CC, ChangeChat caption or ChangeChat instruction file -> references (schema by content).

    An instruction file's records take their task from the file name, as `deltavlm eval` reads them
    (`..._binary.json`: every record is a binary question, however it is worded), else from their questions
    (one round: the task its question asks for, "open" when it is none of the fixed prompts; several rounds:
    a dialogue). With `task` (--task) and a file none of whose one-round questions is a fixed prompt, those
    records are questions of that task: "Have these two images changed? Answer yes or no." is a binary
    question when --task binary says so. Where the file does use the fixed prompts, its other questions are
    open questions and --task only picks which records are scored."""
    data = read_records(path, "reference file")
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _levir_cc_references(data["images"], split, path)
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        if "conversations" in data[0]:
            return _instruction_references(data, path, task_from_file_name(Path(path)), task)
        if "captions" in data[0]:
            return _caption_file_references(data, path)
    raise ScoreError(
        f"reference file {path}: unknown layout; expected LevirCCcaptions.json ({{'images': [...]}}), "
        "a ChangeChat caption list ([{image_A, captions, changeflag}]) or a ChangeChat instruction list "
        "([{id, image, conversations}])"
    )


def _malformed(path, number: int, error: Exception) -> ScoreError:
    """A reference entry without a field the layout needs, or with one of the wrong type."""
    reason = f"missing field {error}" if isinstance(error, KeyError) else f"a field has the wrong type ({error})"
    return ScoreError(f"reference file {path} item {number}: {reason}")


def _levir_cc_references(images: list, split: str, path) -> list[Reference]:
    references = []
    for number, image in enumerate(images, start=1):
        if not isinstance(image, dict):
            raise _malformed(path, number, TypeError(f"expected an object, got {type(image).__name__}"))
        if split != "all" and image.get("split") != split:
            continue
        try:
            filename, imgid, image_split = image["filename"], image["imgid"], image["split"]
            answers = [sentence["raw"] for sentence in image["sentences"]]
        except (KeyError, TypeError) as error:
            raise _malformed(path, number, error) from None
        uid = f"Levir_CC_{image_split}_img{imgid}"
        references.append(Reference(
            id=uid,
            task="caption",
            # `raw` (" there is no difference .") rather than `tokens`: the authors' protocol reads it;
            # under the standard protocol both give the same token string for every LEVIR-CC sentence.
            answers=answers,
            changed=bool(image["changeflag"]) if "changeflag" in image else None,
            aliases=(uid, *id_aliases(filename), str(imgid)),
        ))
    if not references:
        raise ScoreError(f"LEVIR-CC reference file has no pairs in split {split!r} (use --split train|val|test|all)")
    return references


def _caption_file_references(items: list, path) -> list[Reference]:
    """A pair is matched by its `id` (or `image_id`) where the file gives one, as `deltavlm eval` names it,
    and by image_A's path, file name and stem."""
    references = []
    for number, item in enumerate(items, start=1):
        image_a = str(item.get("image_A", ""))
        aliases = id_aliases(image_a)
        own_id = item.get("id", item.get("image_id"))
        if own_id is not None:
            if isinstance(own_id, (list, dict, bool)):
                raise _malformed(path, number, TypeError(f"'id' must be a string or a number, got {own_id!r}"))
            aliases = [str(own_id), *aliases]
        captions = item.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise _malformed(path, number, TypeError(f"'captions' must be a non-empty list of strings, got {captions!r}"))
        references.append(Reference(
            id=str(own_id) if own_id is not None else aliases[-1],
            task="caption",
            answers=list(captions),
            changed=_changeflag(item.get("changeflag"), path, number),
            aliases=tuple(dict.fromkeys(aliases)),
        ))
    return references


def _changeflag(value, path, number: int) -> bool | None:
    """A caption file's changeflag: 0/1 (or a bool) -> unchanged/changed; -1 or absent -> not given."""
    if value is None or (value == -1 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ScoreError(f"reference file {path} item {number}: 'changeflag' must be 0, 1 or -1 (unknown), got {value!r}")


def _instruction_references(items: list, path, file_task: str | None = None,
                            requested: str | None = None) -> list[Reference]:
    """Instruction items -> references (see `load_references` for their task). A several-round record of a task
    other than dialogue is scored on its last round's answer, as `deltavlm eval` scores it."""
    references = []
    for number, item in enumerate(items, start=1):
        if "id" not in item:
            raise _malformed(path, number, KeyError("id"))
        try:
            rounds = conversation_to_rounds(item["conversations"])
        except KeyError as error:
            raise _malformed(path, number, error) from None
        except ValueError as error:
            raise ScoreError(f"reference file {path} item {number}: {error}") from None
        questions = [question for question, _ in rounds]
        answers = [answer for _, answer in rounds]
        item_task = file_task or ("dialogue" if len(rounds) > 1 else task_of_question(questions[0]))
        if item_task != "dialogue":
            questions, answers = questions[-1:], answers[-1:]
        references.append(Reference(
            id=str(item["id"]), task=item_task, answers=answers, questions=questions, aliases=(str(item["id"]),)
        ))
    single_round = [r for r in references if len(r.answers) == 1 and r.task != "dialogue"]
    if not file_task and requested not in (None, "open", "dialogue") and single_round and all(
            r.task == "open" for r in single_round):
        for reference in single_round:  # worded in none of the fixed prompts: --task says what they ask
            reference.task = requested
    return references


def inline_references(predictions: list[Prediction]) -> list[Reference]:
    """References carried by the prediction records themselves (CCExpert, DeltaVLM eval output)."""
    missing = [p.id for p in predictions if not p.references]
    if missing:
        raise ScoreError(
            f"no --references given and {len(missing)} prediction records carry no references "
            f"(e.g. id {missing[0]!r}; fields {', '.join(REFERENCE_KEYS)})"
        )
    return [
        Reference(id=p.id, task=p.task, answers=list(p.references), questions=p.questions, changed=p.changed,
                  aliases=(p.id,))
        for p in predictions
    ]


# ---------------------------------------------------------------------------------------------
# matching and scoring

def match(predictions: list[Prediction], references: list[Reference]) -> tuple[list, dict]:
    """Pair predictions with references by id (see the module docstring).

    Ids are unique within a task, not across tasks (`deltavlm eval` numbers each task file's records from 1):
    a prediction goes to a reference of its own task first. When the prediction file holds several tasks, a
    prediction never goes to a reference of another task (binary "1" is not caption "1"); a file of one task
    may still be scored against references that name their task differently. A second prediction for a
    reference already taken is counted as a duplicate.

    Returns ([(prediction, reference)] in reference order, report) where report counts num_predictions,
    num_references, num_matched, num_missing (references without a prediction), num_extra (predictions
    without a reference) and num_duplicate_matches, with a few example ids of each.
    """
    by_alias: dict[str, list[int]] = {}
    for index, reference in enumerate(references):
        for alias in dict.fromkeys(reference.aliases or (reference.id,)):
            by_alias.setdefault(alias, []).append(index)
    several_tasks = len({p.task for p in predictions if p.task is not None}) > 1
    matched: dict[int, Prediction] = {}
    extra, duplicates = [], 0
    for prediction in predictions:
        index = _reference_for(prediction, references, by_alias, matched, several_tasks)
        if index is None:
            extra.append(prediction.id)
        elif index in matched:
            duplicates += 1
        else:
            matched[index] = prediction
    pairs = [(matched[i], r) for i, r in enumerate(references) if i in matched]
    missing = [r.id for i, r in enumerate(references) if i not in matched]
    report = {
        "num_predictions": len(predictions),
        "num_references": len(references),
        "num_matched": len(pairs),
        "num_missing": len(missing),
        "num_extra": len(extra),
        "num_duplicate_matches": duplicates,
        "missing_examples": missing[:EXAMPLES_SHOWN],
        "extra_examples": extra[:EXAMPLES_SHOWN],
    }
    return pairs, report


def _reference_for(prediction: Prediction, references: list[Reference], by_alias: dict, matched: dict,
                   several_tasks: bool) -> int | None:
    """Index of the reference a prediction goes to: its first id form that names one, a reference of its own
    task before others, one not yet taken before one taken (that makes the prediction a duplicate)."""
    for alias in id_aliases(prediction.id):
        candidates = by_alias.get(alias, [])

        def same_task(i):
            return prediction.task is None or references[i].task in (None, prediction.task)

        allowed = [i for i in candidates if same_task(i)]
        if not several_tasks:
            allowed += [i for i in candidates if not same_task(i)]
        if allowed:
            return next((i for i in allowed if i not in matched), allowed[0])
    return None


def score_pairs(pairs: list, task: str | None = None, protocol: str = "standard",
                meteor: bool = True) -> tuple[dict, int]:
    """Scores per task of matched (prediction, reference) pairs.

    task: score every pair as this task (a reference of another known task is left out and
    counted), or None to use each reference's own task (caption when the source does not say).
    Returns ({task: scores}, number of pairs left out for being another task); binary / count /
    localization scores also count num_unparsed_references, the references whose answer could not
    be parsed (left out, with a warning).
    """
    groups: dict[str, list] = {}
    skipped_other_task = 0
    for prediction, reference in pairs:
        own_task = reference.task or prediction.task
        if task is not None and own_task not in (None, task):
            skipped_other_task += 1
            continue
        groups.setdefault(task or own_task or "caption", []).append((prediction, reference))
    if not groups:
        raise ScoreError(f"no matched sample is a {task!r} sample ({skipped_other_task} of other tasks)")
    return {name: _score_group(name, group, protocol, meteor) for name, group in groups.items()}, skipped_other_task


def _score_group(task: str, group: list, protocol: str, meteor: bool) -> dict:
    if task == "dialogue":
        return _score_dialogue_group(group, protocol, meteor)
    texts = [_single_text(p, task) for p, _ in group] if task != "dialogue" else None
    if task == "caption":
        references = [r.answers for _, r in group]
        changed = [
            r.changed if r.changed is not None else not is_no_change_caption_set(r.answers) for _, r in group
        ]
        return caption_scores_by_change(texts, references, changed, protocol=protocol, meteor=meteor)
    if task == "open":
        return caption_scores(texts, [r.answers[:1] for _, r in group], protocol=protocol, meteor=meteor)
    return _score_parsed_task(task, texts, [r.answers[0] for _, r in group])


def _score_parsed_task(task: str, texts: list[str], answers: list[str]) -> dict:
    gold = [parse_answer(task, answer) for answer in answers]
    kept = [i for i, label in enumerate(gold) if label is not None]
    metric = {"binary": binary_metrics, "count": count_metrics, "localization": localization_metrics}[task]
    scores = metric([parse_answer(task, texts[i]) for i in kept], [gold[i] for i in kept])
    scores["num_unparsed_references"] = len(gold) - len(kept)
    if len(gold) != len(kept):
        print(f"deltavlm score: warning: {len(gold) - len(kept)} {task} reference answers cannot be parsed "
              f"and are left out (e.g. {answers[gold.index(None)]!r})", file=sys.stderr)
    return scores


def _single_text(prediction: Prediction, task: str) -> str:
    if isinstance(prediction.text, list):
        raise ScoreError(f"prediction {prediction.id!r}: a list of answers is only valid for dialogues, not {task}")
    return prediction.text


def _score_dialogue_group(group: list, protocol: str, meteor: bool) -> dict:
    """Dialogues with one predicted answer per reference turn are scored; one with fewer (an interrupted run)
    is left out and counted as num_incomplete; one with more, or without questions, is an error."""
    dialogues, incomplete = [], []
    for prediction, reference in group:
        dialogue = _dialogue(prediction, reference)
        if dialogue is None:
            incomplete.append(prediction.id)
        else:
            dialogues.append(dialogue)
    if incomplete:
        print(f"deltavlm score: warning: {len(incomplete)} dialogue predictions have fewer turns than their "
              f"references and are left out (e.g. {incomplete[0]!r})", file=sys.stderr)
    if not dialogues:
        raise ScoreError(f"no dialogue prediction has an answer for every turn ({len(incomplete)} incomplete)")
    scores = score_dialogues(dialogues, protocol=protocol, meteor=meteor)
    scores["num_incomplete"] = len(incomplete)
    if scores.get("num_unparsed_references"):
        print(f"deltavlm score: warning: {scores['num_unparsed_references']} dialogue turns have a reference "
              "answer that cannot be parsed and are left out of their turn's scores", file=sys.stderr)
    return scores


def _dialogue(prediction: Prediction, reference: Reference) -> dict | None:
    """One dialogue for `score_dialogues`, or None when the prediction stops before the last turn."""
    questions = reference.questions or prediction.questions
    answers = prediction.text if isinstance(prediction.text, list) else [prediction.text]
    if len(answers) < len(reference.answers) and questions:
        return None
    if not questions or len(answers) != len(reference.answers) or len(questions) != len(answers):
        raise ScoreError(
            f"dialogue {prediction.id!r}: {len(answers)} predicted turns, {len(reference.answers)} reference turns, "
            f"{len(questions or [])} questions; a dialogue prediction must list one answer per turn"
        )
    return {"questions": questions, "predictions": answers, "references": reference.answers}


# ---------------------------------------------------------------------------------------------
# report

def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _caption_rows(named_scores: dict) -> str:
    rows = [[name, str(s["num_samples"]), *(_number(s[m]) for m in CAPTION_METRICS)] for name, s in named_scores.items()]
    return _table(["pairs", "N", *CAPTION_METRICS], rows)


def task_table(task: str, scores: dict) -> str:
    """Markdown table of one task's scores."""
    if task == "caption":
        return _caption_rows(scores)
    if task == "open":
        return _caption_rows({"all": scores})
    if task == "binary":
        return _table(
            ["N", "unparsed", "accuracy", "precision", "recall", "F1"],
            [[str(scores["num_samples"]), str(scores["num_unparsed"]),
              *(_number(scores[k]) for k in ("accuracy", "precision", "recall", "f1"))]],
        )
    if task == "count":
        return _table(
            ["category", "N", "unparsed", "MAE", "RMSE"],
            [[c, str(scores["num_samples"]), str(scores["num_unparsed"]), _number(scores[c]["mae"], 3),
              _number(scores[c]["rmse"], 3)] for c in CATEGORIES],
        )
    if task == "localization":
        keys = ("precision", "recall", "f1", "jaccard", "exact_match")
        return _table(
            ["category", "N", "unparsed", "Hamming loss", "P", "R", "F1", "Jaccard", "exact match"],
            [[c, str(scores["num_samples"]), str(scores["num_unparsed"]), _number(scores[c]["hamming_loss"], 4),
              *(_number(scores[c][k]) for k in keys)] for c in CATEGORIES],
        )
    if task == "dialogue":
        parts = []
        for turn, by_task in scores["turns"].items():
            for turn_task, turn_scores in by_task.items():
                flat_task = "open" if turn_task == "caption" else turn_task  # turn captions have no subsets
                parts.append(f"turn {turn} ({turn_task})\n\n{task_table(flat_task, turn_scores)}")
        parts.append(f"final turn (caption metrics)\n\n{_caption_rows({'all': scores['final_turn']})}")
        return "\n\n".join(parts)
    raise ValueError(f"unknown task {task!r}")


def markdown_report(results: dict) -> str:
    sections = []
    for task in TASKS:
        if task in results["tasks"]:
            sections.append(f"### {task}\n\n{task_table(task, results['tasks'][task])}")
    return "\n\n".join(sections)


# ---------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltavlm score",
        description="Score a prediction file against references (no model needed). Prints a Markdown table.",
    )
    parser.add_argument("--predictions", required=True, help="JSON or JSONL prediction file")
    parser.add_argument("--references", help="LevirCCcaptions.json, a ChangeChat caption or instruction file; "
                        "default: the references inside the prediction records")
    parser.add_argument("--task", choices=TASKS, help="score every sample as this task (default: from the references)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                        help="caption normalisation: standard (DESIGN.md §5, the published numbers' protocol), "
                        "the authors' notebooks, or coco (coco-caption's PTB tokenizer; needs java)")
    parser.add_argument("--split", default="test", help="LEVIR-CC split to score against (train|val|test|all)")
    parser.add_argument("--out", help="write the scores as JSON here")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs java and ~5 s to start)")
    return parser


def score_files(predictions_path, references_path=None, task=None, protocol="standard", split="test",
                meteor=True) -> dict:
    """Everything `deltavlm score` does short of printing: returns the JSON-ready result."""
    if protocol == "coco" and not java_available():
        raise ScoreError("--protocol coco runs the Stanford PTB tokenizer and needs `java` on PATH "
                         "(install a Java runtime, e.g. apt-get install default-jre-headless)")
    predictions, duplicates, incomplete = load_predictions(predictions_path)
    if incomplete:
        print(f"deltavlm score: warning: {len(incomplete)} records of the prediction file have turns missing and "
              f"are left out (e.g. {incomplete[0]!r}); rerun `deltavlm eval` into the same folder to finish them",
              file=sys.stderr)
    if references_path:
        references = load_references(references_path, split, task)
        pairs, report = match(predictions, references)
        duplicates += report.pop("num_duplicate_matches")
    else:  # each record carries its own references: pair them directly (ids may repeat across tasks)
        references = inline_references(predictions)
        pairs = list(zip(predictions, references))
        report = {"num_predictions": len(pairs), "num_references": len(pairs), "num_matched": len(pairs),
                  "num_missing": 0, "num_extra": 0, "missing_examples": [], "extra_examples": []}
    report["num_duplicate_predictions"] = duplicates
    report["num_incomplete_predictions"] = len(incomplete)
    if not pairs:
        raise ScoreError(
            f"no prediction id matches a reference id (predictions like {predictions[0].id!r}, "
            f"references like {references[0].id!r})"
        )
    if report["num_missing"] or report["num_extra"]:
        print(
            f"deltavlm score: warning: {report['num_missing']} references have no prediction "
            f"(e.g. {report['missing_examples'][:2]}), {report['num_extra']} predictions match no reference "
            f"(e.g. {report['extra_examples'][:2]}); scoring the {report['num_matched']} matched",
            file=sys.stderr,
        )
    scores, report["num_skipped_other_tasks"] = score_pairs(pairs, task=task, protocol=protocol, meteor=meteor)
    return {
        "predictions": str(predictions_path),
        "references": str(references_path) if references_path else "inline",
        "protocol": protocol,
        "matching": report,
        "tasks": scores,
    }


def main(argv=None) -> int:
    """`deltavlm score ...`: returns 0, or 2 with one error line on stderr for bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help or an argparse error (already printed)
        return int(stop.code or 0)
    try:
        results = score_files(args.predictions, args.references, args.task, args.protocol, args.split,
                              meteor=not args.no_meteor)
    except ScoreError as error:
        print(f"deltavlm score: error: {error}", file=sys.stderr)
        return 2
    print(markdown_report(results))
    for message in dict.fromkeys(_meteor_errors(results["tasks"])):  # each distinct message once
        print(f"\nnote: {message}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0


def _meteor_errors(scores) -> list[str]:
    """Every METEOR message anywhere in the nested scores."""
    if not isinstance(scores, dict):
        return []
    found = [scores["meteor_error"]] if "meteor_error" in scores else []
    for value in scores.values():
        found += _meteor_errors(value)
    return found


if __name__ == "__main__":
    sys.exit(main())
