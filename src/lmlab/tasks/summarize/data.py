"""Dialogue-summarization data: the bundled sample set and loaders for DialogSum's formats.

A record is a ``Dialogue``: an id, the dialogue text (``#Person1#: ...`` turns, one per line), zero or
more reference summaries, and a topic. Sources ``load_dialogues`` understands:

* ``None`` or ``"sample"``  the bundled set ``sample.jsonl`` (original dialogues written for lmlab),
                            read with ``importlib.resources`` so it works from an installed wheel;
* ``*.jsonl`` / ``*.json``  DialogSum's original JSONL: ``fname`` (or ``id``), ``dialogue``,
                            ``summary`` (or ``summary1``, ``summary2``, ... for several references), ``topic``;
* ``*.csv``                 the Hugging Face CSV layout: ``id, dialogue, summary, topic``;
* ``"hf:ID"`` / ``"hf:ID:SPLIT"``  a Hugging Face dataset through ``datasets.load_dataset`` (needs the
                            optional ``datasets`` package and a network connection; split defaults to test).

Records without references (e.g. DialogSum's hidden test split) load fine: they can be summarized
but not scored (``require_references`` says so clearly). Empty dialogues are skipped and reported.
Malformed input raises ``DataError`` naming the file and line (or byte offset for bad UTF-8).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmlab.errors import DataError
from lmlab.jsonl import iter_objects

SAMPLE = "sample"
_SUMMARY_N = re.compile(r"^summary(\d+)$")


@dataclass
class Dialogue:
    id: str
    dialogue: str
    references: list[str] = field(default_factory=list)
    topic: str = ""

    @property
    def n_turns(self) -> int:
        return sum(1 for line in self.dialogue.splitlines() if line.strip())


@dataclass
class DialogueSet:
    """Loaded records plus what was skipped and a fingerprint of the source bytes (for resume checks)."""

    records: list[Dialogue]
    source: str  # a display name: "sample (bundled)", a path, "hf:knkarthick/dialogsum:test"
    fingerprint: str  # sha256 of the source content (first 16 hex digits)
    skipped: list[str] = field(default_factory=list)  # one message per skipped record

    def __len__(self) -> int:
        return len(self.records)


def read_utf8(path: str | Path) -> str:
    """Read a text file as UTF-8; bad bytes raise DataError naming the file and the byte offset."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"data path {str(path)!r} is a directory; pass a .jsonl or .csv file")
    raw = path.read_bytes()
    return _decode(raw, str(path))


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
            f"(re-save the file as UTF-8)"
        ) from None


def references_from_record(record: dict) -> list[str]:
    """Reference summaries of a record: `summary`, then `summary1`, `summary2`, ... or a `references` list."""
    refs: list[str] = []
    if isinstance(record.get("references"), list):
        refs.extend(str(r) for r in record["references"])
    if record.get("summary") not in (None, ""):
        refs.append(str(record["summary"]))
    numbered = sorted((int(m.group(1)), k) for k in record if (m := _SUMMARY_N.match(k)))
    refs.extend(str(record[k]) for _, k in numbered if record[k] not in (None, ""))
    return [r.strip() for r in refs if str(r).strip()]


def _to_dialogue(record: dict, where: str, skipped: list[str]) -> Dialogue | None:
    """Validate one raw record; `where` is "file:line" for messages. Returns None for a reported skip."""
    if "dialogue" not in record:
        raise DataError(f"{where}: missing field 'dialogue' (fields present: {', '.join(sorted(record)) or 'none'})")
    ident = record.get("fname", record.get("id"))
    if ident in (None, ""):
        raise DataError(f"{where}: missing field 'fname' (or 'id')")
    dialogue = record["dialogue"]
    if not isinstance(dialogue, str):
        raise DataError(f"{where}: field 'dialogue' must be a string, got {type(dialogue).__name__}")
    if not dialogue.strip():
        skipped.append(f"{where}: skipped {ident!s}: empty dialogue")
        return None
    # DialogSum's CSVs use \r\n inside fields; normalise so turns are one per line.
    dialogue = dialogue.replace("\r\n", "\n").strip()
    return Dialogue(id=str(ident), dialogue=dialogue, references=references_from_record(record),
                    topic=str(record.get("topic") or ""))


def parse_jsonl(text: str, name: str) -> tuple[list[Dialogue], list[str]]:
    records, skipped = [], []
    for lineno, raw in iter_objects(text.splitlines(), name):
        record = _to_dialogue(raw, f"{name}:{lineno}", skipped)
        if record is not None:
            records.append(record)
    return records, skipped


def parse_csv(text: str, name: str) -> tuple[list[Dialogue], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    for needed in ("id", "dialogue"):
        if needed not in header and not (needed == "id" and "fname" in header):
            raise DataError(f"{name}:1: missing column {needed!r} (header: {', '.join(header) or 'empty'})")
    records, skipped = [], []
    for raw in reader:
        record = _to_dialogue({k: v for k, v in raw.items() if k is not None}, f"{name}:{reader.line_num}", skipped)
        if record is not None:
            records.append(record)
    return records, skipped


def _check_unique(records: list[Dialogue], name: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise DataError(f"{name}: duplicate id {r.id!r}; ids must be unique (results are keyed by id)")
        seen.add(r.id)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_sample() -> DialogueSet:
    """The bundled sample set (original dialogues in DialogSum's style), via importlib.resources."""
    raw = resources.files("lmlab.tasks.summarize").joinpath("sample.jsonl").read_bytes()
    text = _decode(raw, "sample.jsonl (bundled)")
    records, skipped = parse_jsonl(text, "sample.jsonl")
    return DialogueSet(records, "sample (bundled)", _fingerprint(text), skipped)


def load_file(path: str | Path) -> DialogueSet:
    """A DialogSum JSONL file or a Hugging Face style CSV file (chosen by the file extension)."""
    path = Path(path)
    text = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records, skipped = parse_jsonl(text, str(path))
    elif suffix == ".csv":
        records, skipped = parse_csv(text, str(path))
    else:
        raise DataError(f"data file {str(path)!r} has an unknown extension {suffix!r}; use .jsonl or .csv")
    _check_unique(records, str(path))
    return DialogueSet(records, str(path), _fingerprint(text), skipped)


def load_hf(spec: str) -> DialogueSet:
    """``ID`` or ``ID:SPLIT`` through ``datasets.load_dataset`` (columns id/fname, dialogue, summary, topic)."""
    dataset_id, _, split = spec.partition(":")
    split = split or "test"
    try:
        import datasets  # optional dependency (pip install 'lmlab[data]'), imported only for hf: sources
    except ImportError:
        raise DataError(
            f"hf:{spec} needs the 'datasets' package (pip install datasets), which is not installed; "
            f"or download the dataset and pass a local .jsonl/.csv file with --data"
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: all the same to the user
        raise DataError(
            f"could not load Hugging Face dataset {dataset_id!r} (split {split!r}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; when offline pass a local .jsonl/.csv file with --data"
        ) from None
    records, skipped = [], []
    for i, raw in enumerate(ds):
        record = _to_dialogue(dict(raw), f"hf:{dataset_id}:{split}[{i}]", skipped)
        if record is not None:
            records.append(record)
    _check_unique(records, f"hf:{spec}")
    fp = _fingerprint(f"{dataset_id}:{split}:{getattr(ds, '_fingerprint', len(records))}")
    return DialogueSet(records, f"hf:{dataset_id}:{split}", fp, skipped)


def load_dialogues(source: str | Path | None = None) -> DialogueSet:
    """Load dialogues from the bundled sample (None / "sample"), a file, or "hf:ID[:SPLIT]"."""
    if source is None or str(source) == SAMPLE:
        return load_sample()
    text = str(source)
    if text.startswith("hf:"):
        return load_hf(text[3:])
    return load_file(source)


def require_references(records: list[Dialogue], source: str) -> None:
    """Scoring needs references: raise DataError when any record has none (e.g. a hidden test split)."""
    missing = [r.id for r in records if not r.references]
    if missing:
        raise DataError(
            f"cannot score {source}: {len(missing)} of {len(records)} dialogues have no reference summary "
            f"(first: {missing[0]!r}); a file without summaries can be summarized but not scored"
        )
