"""ROUGE scoring for summaries: one or several references, best-reference and mean-over-references.

We use Google's ``rouge-score`` package (the implementation behind most published DialogSum numbers)
with Porter stemming, and report F-measures for four metrics:

* ``rouge1`` / ``rouge2``  unigram / bigram overlap (counts clipped to the reference's counts);
* ``rougeL``               longest common subsequence over the whole text;
* ``rougeLsum``            "summary-level" LCS: for each reference sentence, the union of its LCS
                           with every predicted sentence. ``rouge-score`` finds sentences by splitting
                           on newlines only, so we split both texts into sentences ourselves first
                           (``split_sentences``) and join them with newlines.

Several references per example (DialogSum's test split has three) are aggregated two ways:

* ``best``  the maximum over references, per metric (what ``rouge_score.score_multi`` and most papers do);
* ``mean``  the mean over references, per metric (less optimistic; rewards agreeing with all annotators).

The corpus score is the unweighted mean over examples. An empty prediction scores 0; a prediction
identical to a reference scores 1 on every metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import DataError, choices_error
from lmlab.jsonl import iter_objects
from lmlab.tasks.summarize.data import read_utf8, references_from_record

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
AGGREGATIONS = ("best", "mean")

# A sentence ends at . ! or ? (possibly followed by closing quotes/brackets) and then whitespace.
# Deliberately simple: dialogue summaries are short, plain prose; abbreviations like "Mr. Smith"
# split a sentence early, which costs ROUGE-Lsum little (the pieces still match in order).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")

_scorer = None


def _get_scorer():
    """One shared RougeScorer (building the Porter stemmer is not free)."""
    global _scorer
    if _scorer is None:
        # imported here: rouge_score pulls in nltk, several seconds of import that loading results, the
        # tables and `lmlab lab --help` (which reads this module's METRICS) should not pay
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    return _scorer


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences for ROUGE-Lsum: at ., ! or ? followed by whitespace, and at newlines."""
    sentences: list[str] = []
    for line in text.splitlines():
        sentences.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return sentences


@dataclass
class ExampleScore:
    """ROUGE F-measures of one prediction against its references, aggregated both ways."""

    best: dict[str, float]  # metric -> max over references
    mean: dict[str, float]  # metric -> mean over references
    per_reference: list[dict[str, float]] = field(default_factory=list)

    def get(self, aggregation: str) -> dict[str, float]:
        if aggregation not in AGGREGATIONS:
            raise choices_error("aggregation", aggregation, AGGREGATIONS)
        return self.best if aggregation == "best" else self.mean

    def to_dict(self) -> dict:
        return {"best": self.best, "mean": self.mean, "per_reference": self.per_reference}


def score_example(prediction: str, references: list[str] | str) -> ExampleScore:
    """Score one prediction against one or several references (F-measure of each metric)."""
    if isinstance(references, str):
        references = [references]
    if not references:
        raise DataError("cannot score a prediction without references (got an empty reference list)")
    scorer = _get_scorer()
    pred_lsum = "\n".join(split_sentences(prediction))
    per_ref = []
    for ref in references:
        plain = scorer.score(ref, prediction)  # rouge_score's argument order is (target, prediction)
        lsum = scorer.score("\n".join(split_sentences(ref)), pred_lsum)
        per_ref.append({
            "rouge1": plain["rouge1"].fmeasure,
            "rouge2": plain["rouge2"].fmeasure,
            "rougeL": plain["rougeL"].fmeasure,
            "rougeLsum": lsum["rougeLsum"].fmeasure,
        })
    best = {m: max(r[m] for r in per_ref) for m in METRICS}
    mean = {m: sum(r[m] for r in per_ref) / len(per_ref) for m in METRICS}
    return ExampleScore(best=best, mean=mean, per_reference=per_ref)


def corpus_score(scores: list[ExampleScore | dict], aggregation: str = "best") -> dict[str, float]:
    """Mean over examples of each metric, using the `best` or `mean` reference aggregation.

    Accepts ExampleScore objects or their ``to_dict()`` form (as stored in results.jsonl).
    """
    if aggregation not in AGGREGATIONS:
        raise choices_error("aggregation", aggregation, AGGREGATIONS)
    if not scores:
        return {m: float("nan") for m in METRICS}
    rows = [s.get(aggregation) if isinstance(s, ExampleScore) else s[aggregation] for s in scores]
    return {m: sum(r[m] for r in rows) / len(rows) for m in METRICS}


def is_looping(text: str, n: int = 3, times: int = 3) -> bool:
    """Whether a summary loops: some run of `n` words occurs `times` times or more (case-insensitive).

    "#Person1# wants to buy a car. #Person1# wants to buy a car. #Person1# wants ..." loops; a summary that
    names a speaker three times does not (a 3-word run rarely recurs three times in 1-2 honest sentences).
    """
    words = re.findall(r"[\w#']+", text.lower())
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def n_words(text: str) -> int:
    """Summary length in whitespace-separated words."""
    return len(text.split())


# --- files ---------------------------------------------------------------------------------------
_PREDICTION_FIELDS = ("prediction", "summary", "output")


def _read_text(path: Path) -> str:
    return read_utf8(path)


def _lines_or_records(path: Path):
    """-> (lines, None) for a plain-text file, or (lines, (line number, object) iterator) for JSONL.

    A file is JSONL when its first line starts with ``{``. Plain text keeps empty lines (an empty
    prediction is valid and scores zero) but not the newline that ends the file.
    """
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[0].lstrip().startswith("{"):
        return lines, iter_objects(lines, str(path))
    return [line.rstrip("\r") for line in lines], None


def read_predictions(path: str | Path) -> list[str]:
    """Predictions, one per line; or JSONL with a `prediction`, `summary` or `output` field per line.

    A file is JSONL when its first non-empty line starts with ``{``. Plain-text files keep empty
    lines (an empty prediction is a valid, zero-scoring prediction) except a final trailing newline.
    """
    path = Path(path)
    lines, records = _lines_or_records(path)
    if records is None:
        return lines
    out = []
    for lineno, record in records:
        for name in _PREDICTION_FIELDS:
            if name in record:
                out.append(str(record[name]))
                break
        else:
            raise DataError(f"{path}:{lineno}: missing field 'prediction' (or 'summary'/'output')")
    return out


def read_references(path: str | Path) -> list[list[str]]:
    """References, one per line; or JSONL with `summary`, `summary1..N` or a `references` list per line."""
    path = Path(path)
    lines, records = _lines_or_records(path)
    if records is None:
        return [[line] for line in lines]
    out = []
    for lineno, record in records:
        refs = references_from_record(record)
        if not refs:
            raise DataError(f"{path}:{lineno}: missing field 'summary' (or 'summary1'.., 'references')")
        out.append(refs)
    return out


@dataclass
class FileScores:
    n: int
    best: dict[str, float]
    mean: dict[str, float]
    mean_words: float
    n_references: int  # max references per example


def score_files(predictions: str | Path, references: str | Path) -> FileScores:
    """Score a predictions file against a references file, line by line (see the two readers)."""
    preds = read_predictions(predictions)
    refs = read_references(references)
    if len(preds) != len(refs):
        raise DataError(
            f"{predictions} has {len(preds)} predictions but {references} has {len(refs)} references; "
            "they must match line by line"
        )
    if not preds:
        raise DataError(f"{predictions} holds no predictions")
    scores = [score_example(p, r) for p, r in zip(preds, refs)]
    return FileScores(
        n=len(preds),
        best=corpus_score(scores, "best"),
        mean=corpus_score(scores, "mean"),
        mean_words=sum(n_words(p) for p in preds) / len(preds),
        n_references=max(len(r) for r in refs),
    )


def format_scores_table(rows: list[tuple[str, dict[str, float]]], scale: float = 100.0) -> str:
    """A small fixed-width table: one row per (name, metric -> F) pair, scores in percent."""
    width = max([len("name")] + [len(name) for name, _ in rows])
    head = f"{'name':<{width}}  " + "  ".join(f"{m:>9}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for name, scores in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{scores[m] * scale:9.2f}" for m in METRICS))
    return "\n".join(lines)
