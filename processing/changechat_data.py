"""Loading ChangeChat-105k and LEVIR-CC annotations into one record format, as `datasets.Dataset`s.

Three public layouts are read:

* ChangeChat instruction files (binary, count, loc, open, dialog and the mixed train file): a JSON list of
  `{"id", "image": [before, after], "conversations": [{"from": "human", "value": "<image> <image> ..."},
  {"from": "gpt", "value": ...}, ...]}`;
* ChangeChat caption files: a JSON list of `{"image_A", "image_B", "captions": [5 refs], "changeflag"}`;
* LEVIR-CC's `LevirCCcaptions.json`: `{"images": [{"filepath", "filename", "imgid", "split", "sentences":
  [{"raw", "tokens", ...}], "changeflag"}]}` with images at `{filepath}/A|B/{filename}`.

Each becomes records with the columns of `RECORD_FEATURES`: `id`, `task`, `image_before`/`image_after`
(absolute paths, checked to lie under the image root; images are decoded later, lazily), `questions` /
`answers` (the dialogue rounds; one round for single-turn tasks), `references` (what the last answer is
scored against: the five captions for captioning) and `changeflag` (-1 when unknown).
"""

import json
import re
from pathlib import Path

import datasets
from PIL import Image

from .conversation import TASK_PROMPTS, conversation_to_rounds, task_of_question

TASKS = ("caption", "binary", "count", "localization", "open", "dialogue")

RECORD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "task": datasets.Value("string"),
        "image_before": datasets.Value("string"),
        "image_after": datasets.Value("string"),
        "questions": datasets.Sequence(datasets.Value("string")),
        "answers": datasets.Sequence(datasets.Value("string")),
        "references": datasets.Sequence(datasets.Value("string")),
        "changeflag": datasets.Value("int32"),
    }
)

# File-name suffixes of the ChangeChat-105k test files (changechat_105k_test_binary.json, ...).
# Last part of a file name -> task ("changechat_105k_test_loc.json" -> localization).
FILE_SUFFIX_TASKS = {
    "caption": "caption", "binary": "binary", "count": "count", "loc": "localization", "localization": "localization",
    "open": "open", "dialog": "dialogue", "dialogue": "dialogue",
}
_NO_CHANGE_CAPTIONS = {
    "there is no difference",
    "the two scenes seem identical",
    "the scene is the same as before",
    "no change has occurred",
    "almost nothing has changed",
}


def resolve_image(image_root: Path, relative: str, where: str) -> str:
    """`image_root / relative` as an absolute path; refuses paths that escape the root."""
    root = image_root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{where}: image path {relative!r} escapes the image root {root}")
    return str(path)


def load_changechat(annotation_file, image_root, task: str | None = None) -> datasets.Dataset:
    """A ChangeChat file (instruction or caption schema) -> records. `task` overrides the task taken from the
    file name (`..._binary.json` etc.); otherwise caption files are "caption", mixed files get a task per record
    from their questions (one round: that question's task; several rounds: "dialogue")."""
    annotation_file = Path(annotation_file)
    entries = _read_json_list(annotation_file)
    file_task = task or task_from_file_name(annotation_file)
    return _records_from_entries(entries, Path(image_root), file_task, annotation_file.name)


def _records_from_entries(entries: list, image_root: Path, file_task: str | None, source: str) -> datasets.Dataset:
    records = []
    seen_ids = set()
    for index, entry in enumerate(entries):
        where = f"{source} record {index + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        if "conversations" in entry:
            record = _instruction_record(entry, image_root, file_task, where)
        elif "image_A" in entry:
            record = _caption_record(entry, image_root, where, default_id=str(index))
        else:
            raise ValueError(f"{where}: neither 'conversations' (instruction schema) nor 'image_A' (caption schema)")
        if record["id"] in seen_ids:
            raise ValueError(f"{where}: duplicate id {record['id']!r}")
        seen_ids.add(record["id"])
        records.append(record)
    return _to_dataset(records)


def load_levircc(captions_file, image_root, split: str | None = "test") -> datasets.Dataset:
    """LEVIR-CC's LevirCCcaptions.json -> caption records of one split (all splits with split=None).
    Record ids are `Levir_CC_{split}_img{imgid}`, the convention of published prediction files."""
    captions_file, image_root = Path(captions_file), Path(image_root)
    try:
        images = json.loads(captions_file.read_text(encoding="utf-8-sig"))["images"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{captions_file}: not a LEVIR-CC captions file ({error})") from error
    if not isinstance(images, list):
        raise ValueError(f"{captions_file}: 'images' must be a list, got {type(images).__name__}")
    records = []
    seen_ids = set()
    for index, image in enumerate(images):
        where = f"{captions_file.name} image {index}"
        if not isinstance(image, dict):
            raise ValueError(f"{where}: expected an object, got {type(image).__name__}")
        if split is not None and image.get("split") != split:
            continue
        try:
            folder, name, sentences = image["filepath"], image["filename"], image["sentences"]
            references = [" ".join(sentence["tokens"]) for sentence in sentences]
        except KeyError as error:
            raise ValueError(f"{where}: missing key {error}") from error
        except TypeError as error:
            raise ValueError(f"{where}: 'sentences' must be a list of {{'tokens': [words]}} ({error})") from error
        record_id = f"Levir_CC_{image.get('split', folder)}_img{image.get('imgid', index)}"
        if record_id in seen_ids:
            raise ValueError(f"{where}: duplicate id {record_id!r} (imgid repeated)")
        seen_ids.add(record_id)
        records.append(
            {
                "id": record_id,
                "task": "caption",
                "image_before": resolve_image(image_root, f"{folder}/A/{name}", where),
                "image_after": resolve_image(image_root, f"{folder}/B/{name}", where),
                "questions": [TASK_PROMPTS["caption"]],
                "answers": [references[0] if references else ""],
                "references": references,
                "changeflag": _changeflag(image.get("changeflag", -1), where),
            }
        )
    if not records:
        raise ValueError(f"{captions_file}: no images in split {split!r}")
    return _to_dataset(records)


def load_records(annotations, image_root=None, task: str | None = None, split: str | None = "test") -> datasets.Dataset:
    """Any supported annotation source -> records: a ChangeChat JSON file, a LevirCCcaptions.json, or a
    Hub dataset id / local `datasets` folder whose rows use one of the schemas (with `image_root` for paths)."""
    path = Path(annotations)
    if path.is_file():
        if image_root is None:
            raise ValueError(f"image_root is required with the annotation file {path}")
        head = path.read_text(encoding="utf-8-sig", errors="replace")[:4096].lstrip()
        if head.startswith("{") and '"images"' in head:
            return load_levircc(path, image_root, split=split)
        return load_changechat(path, image_root, task=task)
    if path.suffix in (".json", ".jsonl"):
        raise FileNotFoundError(f"annotation file not found: {path}")
    # a Hub dataset id or a saved `datasets` folder with rows in one of the ChangeChat schemas
    rows = datasets.load_dataset(str(annotations), split=split or "test")
    return _records_from_entries([dict(row) for row in rows], Path(image_root or "."), task, str(annotations))


def missing_images(records: datasets.Dataset) -> list[str]:
    """Paths of the records' images that do not exist on disk or cannot be read as images (an empty file, or one
    whose header PIL does not know), checked before any compute is spent: otherwise a run stops at the first
    batch that holds one, possibly hours in."""
    paths = set(records["image_before"]) | set(records["image_after"])
    return sorted(path for path in paths if not _readable_image(Path(path)))


def _readable_image(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if path.suffix.lower() in (".tif", ".tiff"):
        return True  # multi-band GeoTIFFs are read by tifffile, not PIL: left to the reader
    try:
        with Image.open(path):  # reads the header only
            return True
    except Image.DecompressionBombError:
        return True  # a header, just a huge one: the reader refuses it with its own message
    except (OSError, ValueError):
        return False


def is_unchanged_caption_set(references: list[str]) -> bool:
    """LEVIR-CC gives every unchanged pair the same five template sentences."""
    return bool(references) and all(_squash(reference) in _NO_CHANGE_CAPTIONS for reference in references)


# --- helpers ---


def _squash(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def task_from_file_name(path: Path) -> str | None:
    """The task a ChangeChat file holds by its name's last part, or None (a mixed or caption file)."""
    suffix = Path(path).stem.rsplit("_", 1)[-1].lower()
    return FILE_SUFFIX_TASKS.get(suffix)


def _changeflag(value, where: str) -> int:
    """-1 (unknown), 0 (unchanged) or 1 (changed); a bool or one of those integers in the file."""
    if isinstance(value, bool) or value in (-1, 0, 1):
        return int(value)
    raise ValueError(f"{where}: 'changeflag' must be 0, 1 (or -1 for unknown), got {value!r}")


def _record_id(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {value!r}")
    return str(value)


def _read_json_list(path: Path) -> list:
    """A JSON list of records (or {"annotations": [...]}), or JSONL: one record per line."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not an error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if not (path.suffix == ".jsonl" or error.msg.startswith("Extra data")):
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        data = _json_lines(text, path)
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _json_lines(text: str, path: Path) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from error
    return records


def _instruction_record(entry: dict, image_root: Path, file_task: str | None, where: str) -> dict:
    images = entry.get("image")
    if not isinstance(images, list) or len(images) != 2 or not all(isinstance(i, str) for i in images):
        raise ValueError(f"{where}: 'image' must be a list of two paths [before, after], got {images!r}")
    if not isinstance(entry.get("conversations"), list):
        raise ValueError(f"{where}: 'conversations' must be a list of turns")
    try:
        rounds = conversation_to_rounds(entry["conversations"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    if file_task is not None:
        task = file_task
    elif len(rounds) > 1:
        task = "dialogue"
    else:
        task = task_of_question(rounds[0][0])
    if entry.get("id") is None:
        raise ValueError(f"{where}: missing 'id'")
    record_id = _record_id(entry["id"], where)
    answers = [answer for _, answer in rounds]
    return {
        "id": record_id,
        "task": task,
        "image_before": resolve_image(image_root, images[0], where),
        "image_after": resolve_image(image_root, images[1], where),
        "questions": [question for question, _ in rounds],
        "answers": answers,
        "references": [answers[-1]],
        "changeflag": _changeflag(entry.get("changeflag", -1), where),
    }


def _caption_record(entry: dict, image_root: Path, where: str, default_id: str) -> dict:
    captions = entry.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'captions' must be a non-empty list of strings")
    for key in ("image_A", "image_B"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"{where}: '{key}' must be an image path, got {entry.get(key)!r}")
    references = [caption.replace(" .", "").strip() for caption in captions]
    changeflag = entry.get("changeflag")
    if changeflag is None:
        changeflag = 0 if is_unchanged_caption_set(references) else 1
    return {
        "id": _record_id(entry.get("id", entry.get("image_id", Path(entry["image_A"]).stem or default_id)), where),
        "task": "caption",
        "image_before": resolve_image(image_root, entry["image_A"], where),
        "image_after": resolve_image(image_root, entry["image_B"], where),
        "questions": [TASK_PROMPTS["caption"]],
        "answers": [references[0]],
        "references": references,
        "changeflag": _changeflag(changeflag, where),
    }


def _to_dataset(records: list[dict]) -> datasets.Dataset:
    if not records:
        raise ValueError("no records")
    columns = {name: [record[name] for record in records] for name in RECORD_FEATURES}
    return datasets.Dataset.from_dict(columns, features=RECORD_FEATURES)


__all__ = [
    "FILE_SUFFIX_TASKS",
    "RECORD_FEATURES",
    "TASKS",
    "is_unchanged_caption_set",
    "load_changechat",
    "load_levircc",
    "load_records",
    "missing_images",
    "resolve_image",
    "task_from_file_name",
    "task_of_question",
]
