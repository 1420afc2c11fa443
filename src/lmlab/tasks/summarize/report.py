"""The lab's outputs: per-experiment summaries of results rows, terminal tables, report.md, report.html, rouge.png.

Everything here works from the rows of ``results.jsonl`` (plain dicts), so a resumed run reports
exactly what was generated, whichever invocation generated it.
"""

from __future__ import annotations

import html
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


def write_report_html(path: Path, *, summaries: list[ExperimentSummary], settings: dict, date: str, records,
                      rows_by_key: dict[tuple[str, str], dict], experiments: list[str],
                      turns: dict[tuple[str, str], dict] | None = None) -> None:
    """report.html: one self-contained page with the settings, the scores (best reference) and, for every
    evaluated dialogue, the human reference and each experiment's summary. With `turns` (``lmlab lab --turns``:
    ``lmlab.inspect.turns.turn_attention`` of each fine-tuned row), a fine-tuned row also shows the dialogue
    with each turn shaded by the share of the summary's attention it received."""
    e = html.escape
    turns = turns or {}
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Dialogue-summarization lab</title>",
           "<style>body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1100px}"
           "table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:3px 7px;text-align:right}"
           "td:first-child,th:first-child{text-align:left}.who{color:#57606a;width:12em;vertical-align:top}"
           ".turn{padding:1px 6px;margin:1px 0;white-space:pre-wrap}.share{color:#57606a;font-size:12px;"
           "display:inline-block;width:4em}.sub{color:#57606a;font-size:12px}.err{color:#9a6700}</style></head><body>",
           "<h1>Dialogue-summarization lab</h1><ul>"]
    out += [f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in settings.items()] + [f"<li><b>date</b>: {e(date)}</li></ul>"]
    out.append("<h2>Scores</h2><p class='sub'>ROUGE F x100, best reference; time: total generation seconds</p><table>"
               "<tr><th>experiment</th><th>n</th>" + "".join(f"<th>{m}</th>" for m in METRIC_LABELS.values()) +
               "<th>words</th><th>empty</th><th>time s</th></tr>")
    for s in summaries:
        out.append(f"<tr><td>{e(s.name)}</td><td>{s.n}</td>" + "".join(f"<td>{s.best[m] * 100:.2f}</td>" for m in METRICS)
                   + f"<td>{s.words:.1f}</td><td>{s.empty}</td><td>{s.seconds:.1f}</td></tr>")
    out.append("</table>")
    if turns:
        averaging = next((t["averaging"] for t in turns.values() if "averaging" in t), "")
        out.append(f"<p class='sub'>Turn shading (fine-tuned rows): {e(averaging)}; the shares are normalized over "
                   "the turns (the rest of the attention goes to the instruction, the template and the summary).</p>")
    out.append("<h2>Summaries</h2>")
    for record in records:
        rows = [(x, rows_by_key[(x, record.id)]) for x in experiments if (x, record.id) in rows_by_key]
        if not rows:
            continue
        out.append(f"<h3>{e(record.id)} ({e(record.topic or '')})</h3><table class='ex'>")
        for i, ref in enumerate(record.references or []):
            out.append(f"<tr><td class='who'>human{i + 1 if len(record.references) > 1 else ''}</td>"
                       f"<td style='text-align:left'>{e(ref)}</td><td></td></tr>")
        for name, row in rows:
            best = row["scores"]["best"]
            out.append(f"<tr><td class='who'>{e(name)}</td><td style='text-align:left'>{e(row['summary']) or '(empty)'}"
                       f"</td><td>R1 {best['rouge1'] * 100:.0f}, RL {best['rougeL'] * 100:.0f}</td></tr>")
            t = turns.get((name, record.id))
            if t is not None:
                out.append(f"<tr><td class='who'>{e(name)}: turns</td><td colspan='2' style='text-align:left'>"
                           f"{_turns_html(t)}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    path.write_text("\n".join(out), encoding="utf-8")


def _turns_html(t: dict) -> str:
    """One fine-tuned row's dialogue, each turn shaded by its share of the summary's attention."""
    if "error" in t:
        return f"<span class='err'>no turn shading: {html.escape(t['error'])}</span>"
    top = max(t["share"]) or 1.0
    return "".join(f"<div class='turn' data-share='{share:.4f}' style='background:rgba(37,99,235,{0.6 * share / top:.3f})'>"
                   f"<span class='share'>{100 * share:.1f}%</span>{html.escape(turn)}</div>"
                   for turn, share in zip(t["turns"], t["share"]))
