"""The lab's outputs: per-experiment summaries of results rows, terminal tables, report.md, rouge.png.

Everything here works from the rows of ``results.jsonl`` (plain dicts), so a resumed run reports
exactly what was generated, whichever invocation generated it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from lmlab.tasks.summarize.rouge import METRICS, corpus_score

METRIC_LABELS = {"rouge1": "R1", "rouge2": "R2", "rougeL": "RL", "rougeLsum": "RLsum"}
AGGREGATION_TEXT = {
    "best": "best reference (max over an example's references, then mean over examples)",
    "mean": "mean over references (per example, then mean over examples)",
}


@dataclass
class ExperimentSummary:
    name: str
    description: str
    n: int  # scored examples
    best: dict[str, float]
    mean: dict[str, float]
    words: float  # mean summary length in words
    empty: int  # summaries that came out empty (e.g. the model recited the dialogue and was stopped)
    prompt_tokens: float  # mean per example
    generated_tokens: float  # mean per example
    seconds: float  # total generation time of the rows (summed over resumed invocations)


def summarize_rows(rows: list[dict], name: str, description: str = "") -> ExperimentSummary:
    """Corpus scores and means of one experiment's rows."""
    n = len(rows)

    def avg(key: str) -> float:
        return sum(r[key] for r in rows) / n if n else float("nan")

    return ExperimentSummary(
        name=name, description=description, n=n,
        best=corpus_score([r["scores"] for r in rows], "best"),
        mean=corpus_score([r["scores"] for r in rows], "mean"),
        words=avg("words"), empty=sum(1 for r in rows if not r["summary"].strip()),
        prompt_tokens=avg("prompt_tokens"), generated_tokens=avg("generated_tokens"),
        seconds=sum(r["seconds"] for r in rows),
    )


def scores_table(summaries: list[ExperimentSummary], aggregation: str = "best", markdown: bool = False) -> str:
    """One row per experiment: R1/R2/RL/RLsum (F x100), mean words, prompt/generated tokens, time."""
    head = ["experiment", "n", *METRIC_LABELS.values(), "words", "empty", "prompt tok", "gen tok", "time s"]
    body = []
    for s in summaries:
        scores = s.best if aggregation == "best" else s.mean
        body.append([s.name, str(s.n), *(f"{scores[m] * 100:.2f}" for m in METRICS), f"{s.words:.1f}", str(s.empty),
                     f"{s.prompt_tokens:.0f}", f"{s.generated_tokens:.1f}", f"{s.seconds:.1f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def examples_text(records, rows_by_key: dict[tuple[str, str], dict], experiments: list[str], n: int,
                  markdown: bool = False, width: int = 100) -> str:
    """The first `n` scored examples: the human reference beside each experiment's summary."""
    out: list[str] = []
    shown = 0
    for record in records:
        if shown >= n:
            break
        if not any((experiment, record.id) in rows_by_key for experiment in experiments):
            continue
        shown += 1
        refs = record.references or ["(no reference)"]
        if markdown:
            out.append(f"### {record.id} ({record.topic})\n")
            out.append("| who | summary | R1 | RL |")
            out.append("|---|---|---:|---:|")
            for i, ref in enumerate(refs):
                out.append(f"| human{'' if len(refs) == 1 else i + 1} | {_md(ref)} | | |")
            for experiment in experiments:
                row = rows_by_key.get((experiment, record.id))
                if row is not None:
                    best = row["scores"]["best"]
                    out.append(f"| {experiment} | {_md(row['summary']) or '(empty)'} | {best['rouge1'] * 100:.1f} "
                               f"| {best['rougeL'] * 100:.1f} |")
            out.append("")
        else:
            out.append(f"== {record.id} ({record.topic})")
            label_width = max(len("human"), *(len(experiment) for experiment in experiments)) + 2
            wrap = lambda label, text: textwrap.fill(
                text or "(empty)", width=width, initial_indent=f"{label:<{label_width}}",
                subsequent_indent=" " * label_width)
            for i, ref in enumerate(refs):
                out.append(wrap("human" if len(refs) == 1 else f"human{i + 1}", ref))
            for experiment in experiments:
                row = rows_by_key.get((experiment, record.id))
                if row is not None:
                    best = row["scores"]["best"]
                    summary = row["summary"] or "(empty)"
                    scores = f"[R1 {best['rouge1'] * 100:.0f}, RL {best['rougeL'] * 100:.0f}]"
                    out.append(wrap(experiment, f"{summary}  {scores}"))
            out.append("")
    return "\n".join(out).rstrip()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report_md(path: Path, *, summaries: list[ExperimentSummary], examples_md: str, settings: dict,
                    aggregations: list[str], date: str, skipped: list[str]) -> None:
    """report.md: run settings, the scores table(s) with the aggregation named, and example summaries."""
    lines = ["# Dialogue-summarization lab", ""]
    for key, value in settings.items():
        lines.append(f"- **{key}**: {value}")
    lines.append(f"- **date**: {date}")
    lines.append("")
    lines.append("## Scores")
    lines.append("")
    lines.append(
        "ROUGE F-measure x100 with Porter stemming (`rouge-score`); RLsum splits sentences at . ! ? before scoring. "
        "`words` is the mean summary length; `empty` counts empty summaries (the model stopped before writing "
        "one, e.g. it began reciting the dialogue); `prompt tok` / `gen tok` are means per example; `time s` is "
        "the total generation time of the experiment.")
    for agg in aggregations:
        lines += ["", f"Reference aggregation: **{agg}** — {AGGREGATION_TEXT[agg]}.", ""]
        lines.append(scores_table(summaries, agg, markdown=True))
    lines += ["", "## Experiments", ""]
    for s in summaries:
        lines.append(f"- `{s.name}`: {s.description}")
    if skipped:
        lines += ["", "## Skipped input", ""] + [f"- {m}" for m in skipped]
    lines += ["", "## Examples: human reference vs. model", "", examples_md, ""]
    path.write_text("\n".join(lines))


def plot_rouge(path: Path, summaries: list[ExperimentSummary], aggregation: str = "best", title: str = "") -> None:
    """Grouped bar chart: one group per ROUGE metric, one bar per experiment."""
    # imported here: matplotlib takes ~1 s to import, and the tables and report.md (and lmlab rouge) never need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(summaries), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(METRICS) + 0.4 * n), 4.2))
    for i, s in enumerate(summaries):
        scores = s.best if aggregation == "best" else s.mean
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(METRICS))]
        bars = ax.bar(xs, [scores[m] * 100 for m in METRICS], width, label=s.name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(METRICS)), [METRIC_LABELS[m] for m in METRICS])
    ax.set_ylabel(f"F-measure x100 ({aggregation} reference)")
    ax.set_title(title or "ROUGE by experiment")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keep long titles inside the image
    plt.close(fig)
