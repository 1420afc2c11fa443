"""`lmlab sweep`: a grid of training recipes and decoding settings, each scored with ROUGE, in one table.

A sweep config (YAML) lists runs. Each run trains with one of lmlab's jobs (``finetune``, ``distill``,
``align``: the one training loop, in its own process and directory) or names weights that already
exist, and is then summarized and scored by ``lmlab lab`` once per decoding setting::

    out_dir: runs/sweep-dialogsum
    workers: 1                  # runs at a time (each a process; on a GPU several share it)
    threads_per_run: 1          # torch threads of each process
    device: auto                # train.device of every job and --device of every evaluation
    eval:                       # the evaluation: `lmlab lab --experiments <experiment>` on these records
      data: ../shared/data/dialogsum/dev.jsonl
      pool_size: 400            # records 0-399 are the training data: never evaluated
      max_new_tokens: 64
      batch_size: 16
      precision: fp32
      experiment: finetuned     # finetuned (an adapter or a fine-tuned model) | student
      decodings:                # every run is scored with each (GenerationConfig fields; best_of N: MBR)
        greedy: {}
        beam4: {num_beams: 4, length_penalty: 1.0}
        mbr8: {best_of: 8}      # the consensus of 8 samples (at the recipe's temperature, else 0.7)
    baseline: shipped           # the run (and its first decoding) the table's paired differences are taken against
    runs:
      - {id: shipped, adapter: shipped}                  # no training: the adapter lmlab ships
      - {id: lr-2e-3, job: finetune, config: configs/finetune-smollm2-dialogsum-lora.yaml,
         set: {train.lr: 2.0e-3}}
    grid:                       # expanded into runs: the product of `vary`, ids from the template
      - {id: "r{lora.r}-lr{train.lr}", job: finetune, config: configs/finetune-smollm2-dialogsum-lora.yaml,
         vary: {lora.r: [16, 64], train.lr: [5.0e-4, 2.0e-3]}}

Run directory ``OUT/<id>/``: ``train/`` (the job's run directory: checkpoints, metrics, best/, final/),
``eval-<decoding>/`` (the lab's results.jsonl and report). One line per finished run in
``OUT/runs.jsonl`` (``lmlab.sweep.runner``): the settings, training time, and per decoding ROUGE-1/2/L,
empty and looping summaries, mean words and the per-example ROUGE-1 that paired comparisons need. A
killed sweep continues where it stopped: finished runs are kept, an unfinished job resumes from its
checkpoint, and finished evaluations are reused.

``lmlab sweep table RUNS.jsonl`` prints the results as a Markdown table with each row's paired difference
from the baseline and its standard error: with 100 dialogues a difference under two standard errors
is no measured difference.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import ConfigError, DataError

JOBS = ("finetune", "distill", "align")
EXPERIMENTS = ("finetuned", "student")


@dataclass
class EvalSpec:
    data: str = "../shared/data/dialogsum/dev.jsonl"
    pool_size: int = 400
    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    precision: str = "fp32"
    experiment: str = "finetuned"
    decodings: dict[str, dict] = field(default_factory=lambda: {"greedy": {}})


@dataclass
class RunSpec:
    id: str
    job: str | None = None  # finetune | distill | align; None: evaluate existing weights
    config: str | None = None  # the job's config file
    set: dict[str, Any] = field(default_factory=dict)  # the job's --set overrides
    adapter: str | None = None  # no job: an adapter directory, or "shipped"
    model: str | None = None  # no job: a model (registry name or directory)
    student: str | None = None  # no job: a student bundle (experiment student)
    decodings: dict[str, dict] | None = None  # this run's decodings instead of eval.decodings


@dataclass
class RecipeSweep:
    out_dir: str = "runs/sweep"
    workers: int = 1
    threads_per_run: int = 1
    device: str = "auto"
    model: str = "smollm2-135m-instruct"  # the base model of the evaluations (--model of lmlab lab)
    eval: EvalSpec = field(default_factory=EvalSpec)
    baseline: str | None = None
    runs: list[RunSpec] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "RecipeSweep":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"sweep config {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse sweep config {str(path)!r}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"sweep config {str(path)!r} must be a mapping of keys to values")
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecipeSweep":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} | {"grid"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown sweep key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        eval_spec = _make(EvalSpec, data.pop("eval", None) or {}, "eval")
        runs = [_make(RunSpec, r, f"runs[{i}]") for i, r in enumerate(data.pop("runs", None) or [])]
        for i, g in enumerate(data.pop("grid", None) or []):
            runs += expand_grid(g, f"grid[{i}]")
        cfg = cls(**data, eval=eval_spec, runs=runs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("workers", "threads_per_run"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        if self.eval.experiment not in EXPERIMENTS:
            raise ConfigError(f"eval.experiment={self.eval.experiment!r} must be one of {', '.join(EXPERIMENTS)}")
        if not Path(self.eval.data).exists():
            raise DataError(f"eval.data {self.eval.data!r} does not exist")
        if not self.runs:
            raise ConfigError("the sweep has no runs: give `runs` and/or `grid`")
        ids = [r.id for r in self.runs]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"run id(s) {', '.join(dupes)} appear more than once")
        for r in self.runs:
            if not re.fullmatch(r"[A-Za-z0-9._+-]+", r.id):
                raise ConfigError(f"run id {r.id!r} may hold only letters, digits and . _ + -")
            if r.job is not None:
                if r.job not in JOBS:
                    raise ConfigError(f"run {r.id}: job={r.job!r} must be one of {', '.join(JOBS)}")
                if r.config is None or not Path(r.config).exists():
                    raise ConfigError(f"run {r.id}: config {r.config!r} does not exist")
            elif sum(x is not None for x in (r.adapter, r.model, r.student)) > 1:
                raise ConfigError(f"run {r.id}: give one of adapter, model or student")
            for name, settings in (r.decodings or self.eval.decodings).items():
                check_decoding(settings, f"run {r.id}, decoding {name}")
        if self.baseline is not None and self.baseline not in ids:
            raise ConfigError(f"baseline={self.baseline!r} is not a run id; runs: {', '.join(ids)}")


def _make(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, not {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_decoding(settings: dict, where: str) -> None:
    """A decoding is GenerationConfig fields, or ``best_of`` N (> 1: minimum Bayes risk over N samples, at
    ``temperature``); a bad one is refused before anything runs."""
    from lmlab.generation.config import GenerationConfig

    if not isinstance(settings, dict):
        raise ConfigError(f"{where} must be a mapping of decoding settings, not {settings!r}")
    n = settings.get("best_of", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{where}: best_of={n!r} must be an integer >= 1")
    if n > 1 and set(settings) - {"best_of", "temperature"}:
        raise ConfigError(f"{where}: best_of={n} (minimum Bayes risk) takes only temperature beside it, not "
                          f"{', '.join(sorted(set(settings) - {'best_of', 'temperature'}))}")
    if n == 1 and "temperature" in settings:
        raise ConfigError(f"{where}: temperature sets the samples of best_of N (N > 1); one summary is greedy or beams")
    GenerationConfig.check_settings({k: v for k, v in settings.items() if k != "best_of"}, where)


def expand_grid(spec: dict, where: str) -> list[RunSpec]:
    """One grid entry -> its runs: every combination of `vary`, the id filled in from the template."""
    spec = dict(spec)
    vary = spec.pop("vary", None) or {}
    template = spec.pop("id", None)
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        raise ConfigError(f"{where}.vary must map each setting to a non-empty list of values")
    if template is None:
        template = "-".join(f"{{{k}}}" for k in vary) or "run"
    runs = []
    for values in itertools.product(*vary.values()):
        chosen = dict(zip(vary, values))
        names = _Names(chosen)
        try:  # not str.format_map: it reads '{lora.r}' as attribute r of 'lora'
            run_id = re.sub(r"\{([^{}]*)\}", lambda m: names[m.group(1)], template)
        except KeyError as exc:
            raise ConfigError(f"{where}.id={template!r}: {exc}") from None
        base = dict(spec)
        base["set"] = {**(base.get("set") or {}), **{k: v for k, v in chosen.items() if not k.startswith("decoding.")}}
        runs.append(_make(RunSpec, {**base, "id": run_id}, where))
    return runs


class _Names(dict):
    """str.format_map over dotted keys: '{train.lr}' reads the value of 'train.lr'."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def __missing__(self, key):
        raise KeyError(f"{{{key}}} is not a varied setting")

    def __getitem__(self, key):
        if key in self.values:
            return _short(self.values[key])
        return self.__missing__(key)


def _short(value) -> str:
    """A setting's value as run ids and the results table write it: 0.002 -> 2e-3 style, lists joined by +."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_short(v) for v in value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- one run -----------------------------------------------------------------------------------
def _lmlab(threads: int) -> list[str]:
    return [sys.executable, "-m", "lmlab", "--threads", str(threads)]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"exit {code}: {tail[0][:300]} (log: {log})")


def train(cfg: RecipeSweep, run: RunSpec, run_dir: Path) -> tuple[dict, float]:
    """Run (or resume, or reuse) the run's training job -> (its summary.json, seconds spent now)."""
    out = run_dir / "train"
    summary_path, seconds_path = out / "summary.json", run_dir / "train_seconds.txt"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("finished"):  # trained by an earlier invocation: its time, as recorded then
            return summary, float(seconds_path.read_text()) if seconds_path.exists() else 0.0
    cmd = _lmlab(cfg.threads_per_run) + [run.job, "--config", str(run.config), "--no-progress"]
    for key, value in {**run.set, "out_dir": str(out), "train.device": cfg.device}.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if (out / "checkpoint.pt").exists():
        cmd.append("--resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _run(cmd, run_dir / "train.log")
    summary = json.loads(summary_path.read_text())
    if not summary.get("finished"):
        raise RuntimeError(f"the {run.job} job stopped before its last step (see {run_dir / 'train.log'})")
    seconds = time.time() - t0 + (float(seconds_path.read_text()) if seconds_path.exists() else 0.0)
    seconds_path.write_text(f"{seconds:.1f}\n")
    return summary, seconds


def weights_args(cfg: RecipeSweep, run: RunSpec, run_dir: Path) -> list[str]:
    """The `lmlab lab` flags that select what this run evaluates."""
    if run.job is not None:
        trained = run_dir / "train" / "best"
        if not trained.exists():
            trained = run_dir / "train" / "final"
        if (trained / "lmlab_student.json").exists():  # a student bundle loads as a model of its own
            return ["--model", str(trained)]
        if (trained / "adapter_config.json").exists():
            return ["--model", cfg.model, "--adapter", str(trained)]
        return ["--model", str(trained)]
    if run.student is not None:
        return ["--model", cfg.model] + (["--student"] if run.student == "shipped" else ["--student", run.student])
    if run.model is not None:
        return ["--model", run.model]
    return ["--model", cfg.model] + ([] if run.adapter in (None, "shipped") else ["--adapter", run.adapter])


def evaluate(cfg: RecipeSweep, run: RunSpec, run_dir: Path, name: str, decoding: dict) -> dict:
    """One `lmlab lab` evaluation (resumed if it was cut) -> the decoding's scores."""
    e = cfg.eval
    out = run_dir / f"eval-{name}"
    # a decoding here is what it says: one summary per dialogue (never the recipe's minimum Bayes risk) unless it
    # asks for best_of N
    mbr = decoding.get("best_of", 1) > 1
    experiment = "finetuned-greedy" if e.experiment == "finetuned" and not mbr else e.experiment
    cmd = _lmlab(cfg.threads_per_run) + ["lab", "--data", e.data, "--pool-size", str(e.pool_size),
                                         "--experiments", experiment, "--max-new-tokens", str(e.max_new_tokens),
                                         "--batch-size", str(e.batch_size), "--precision", e.precision,
                                         "--device", cfg.device, "--no-turns", "--examples", "0", "--out", str(out),
                                         "--engine", "auto"]
    cmd += weights_args(cfg, run, run_dir)
    if e.limit is not None:
        cmd += ["--limit", str(e.limit)]
    flags = {"num_beams": "--num-beams", "length_penalty": "--length-penalty",
             "no_repeat_ngram_size": "--no-repeat-ngram-size", "min_new_tokens": "--min-new-tokens",
             "best_of": "--best-of", "temperature": "--temperature"}
    unsupported = sorted(set(decoding) - set(flags))
    if unsupported:
        raise ConfigError(f"decoding {name}: lmlab lab cannot set {', '.join(unsupported)} (it sets "
                          f"{', '.join(flags)})")
    for key, value in decoding.items():
        cmd += [flags[key], str(value)]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _run(cmd, run_dir / f"eval-{name}.log")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["experiment"] == experiment]
    return {**score_rows(rows), "eval_s": round(time.time() - t0, 1)}


def score_rows(rows: list[dict]) -> dict:
    """ROUGE-1/2/L (x100, best reference), empty and looping summaries, words, and per-example ROUGE-1."""
    from lmlab.tasks.summarize.rouge import is_looping

    rows = sorted(rows, key=lambda r: r["id"])
    n = len(rows)
    if not n:
        raise RuntimeError("the evaluation wrote no rows")

    def mean(metric: str) -> float:
        return round(100 * sum(r["scores"]["best"][metric] for r in rows) / n, 2)

    return {"n": n, "rouge1": mean("rouge1"), "rouge2": mean("rouge2"), "rougeL": mean("rougeL"),
            "empty": sum(not r["summary"].strip() for r in rows),
            "looping": sum(is_looping(r["summary"]) for r in rows),
            "words": round(sum(r["words"] for r in rows) / n, 1),
            "ids": [r["id"] for r in rows],
            "per_example_rouge1": [round(100 * r["scores"]["best"]["rouge1"], 3) for r in rows]}


def run_one(cfg: RecipeSweep, run: RunSpec) -> dict:
    """Train (if the run has a job), then evaluate every decoding -> the run's record."""
    run_dir = Path(cfg.out_dir) / run.id
    record: dict[str, Any] = {"id": run.id, "job": run.job, "config": run.config, "set": run.set,
                              "weights": run.adapter or run.model or run.student, "train_s": 0.0}
    if run.job is not None:
        summary, seconds = train(cfg, run, run_dir)
        record["train_s"] = round(seconds, 1)
        record["train"] = {k: summary.get(k) for k in ("step", "train_loss", "best_score", "best_step", "metrics",
                                                       "trainable_parameters")}
    record["evals"] = {name: evaluate(cfg, run, run_dir, name, decoding)
                       for name, decoding in (run.decodings or cfg.eval.decodings).items()}
    record["decodings"] = run.decodings or cfg.eval.decodings
    return record


def sweep(cfg: RecipeSweep, echo=print, only: list[str] | None = None) -> Path:
    """Run every run of `cfg` not yet in OUT/runs.jsonl -> the path of runs.jsonl."""
    from lmlab.sweep.runner import RUNS_FILE, Job, done_ids, run_jobs

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = cfg.runs if not only else [r for r in cfg.runs if r.id in set(only)]
    if only and len(runs) != len(set(only)):
        missing = sorted(set(only) - {r.id for r in cfg.runs})
        raise ConfigError(f"--only: no run(s) named {', '.join(missing)}")
    done = done_ids(out / RUNS_FILE)
    echo(f"sweep: {len(runs)} run(s), {sum(r.id in done for r in runs)} already done; {cfg.workers} at a time on "
         f"{cfg.device}, {cfg.threads_per_run} thread(s) each; results in {out / RUNS_FILE}")

    def describe(record: dict) -> str:
        return ", ".join(f"{name} R1 {s['rouge1']:.2f} (empty {s['empty']}, loops {s['looping']})"
                         for name, s in record["evals"].items())

    jobs = [Job(r.id, (lambda r=r: run_one(cfg, r)), cost=1.0 + (2.0 if r.job else 0.0), describe=describe)
            for r in runs]
    run_jobs(jobs, out, workers=cfg.workers, echo=echo)
    return out / RUNS_FILE


# --- the results table -------------------------------------------------------------------------
def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a - b, its standard error) over paired examples."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def table(records: list[dict], baseline: str | None = None) -> str:
    """A Markdown table: one row per (run, decoding), with the paired difference from the baseline."""
    base = None
    if baseline is not None:
        hit = [r for r in records if r["id"] == baseline]
        if not hit:
            raise ConfigError(f"baseline {baseline!r} is not in the records; runs: {', '.join(r['id'] for r in records)}")
        first = next(iter(hit[0]["evals"].values()))
        base = dict(zip(first["ids"], first["per_example_rouge1"]))
    # settings every trained run shares (bookkeeping like eval_every) are left out of the table's column
    trained = [r.get("set") or {} for r in records if r.get("job")]
    common = {k for k in (trained[0] if trained else {})
              if len(trained) > 1 and all(k in s and s[k] == trained[0][k] for s in trained)}
    lines = ["| run | settings | decoding | ROUGE-1 | ROUGE-2 | ROUGE-L | empty | loops | words | "
             f"{'Δ R-1 ± SE vs ' + baseline if base else 'Δ'} | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        settings = (", ".join(f"{k}={_short(v)}" for k, v in (r.get("set") or {}).items() if k not in common)
                    or (r.get("weights") or (r.get("job") or "")))
        for name, s in r["evals"].items():
            delta = ""
            if base is not None and r["id"] == baseline and name == next(iter(r["evals"])):
                delta = "(baseline)"
            elif base is not None:
                pairs = [(x, base[i]) for i, x in zip(s["ids"], s["per_example_rouge1"]) if i in base]
                if len(pairs) > 1:
                    m, se = paired([x for x, _ in pairs], [y for _, y in pairs])
                    mark = " **(≥ 2 SE)**" if abs(m) >= 2 * se and se > 0 else ""
                    delta = f"{m:+.2f} ± {se:.2f}{mark}"
            decoding = ", ".join(f"{k}={v}" for k, v in (r.get("decodings") or {}).get(name, {}).items()) or "greedy"
            decoding = name if decoding == name else f"{name}: {decoding}"
            lines.append(f"| {r['id']} | {settings} | {decoding} | {s['rouge1']:.2f} | {s['rouge2']:.2f} | "
                         f"{s['rougeL']:.2f} | {s['empty']} | {s['looping']} | {s['words']} | {delta} | "
                         f"{r.get('train_s', 0):.0f} |")
    return "\n".join(lines)
