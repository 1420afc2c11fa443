"""The summarization lab: run named experiments over a dialogue set, score them with ROUGE, report.

``run_lab(LabSettings(...))`` does, in order:

1. validate everything that can be wrong before any generation: experiment names, the data (missing
   fields, bad UTF-8, missing references), the shot pool (k larger than the pool), the output folder
   (results of a run with different settings);
2. split the data: with ``shots_from`` every record is evaluated and shots come from that file;
   otherwise the first ``pool_size`` records (default 4) are the shot pool and the rest are evaluated
   (``limit`` then keeps the first N of those). A dialogue is never its own shot;
3. for each experiment, build prompts (``lmlab.prompting``), generate in batches (``lmlab.generation``)
   and append one row per (experiment, example) to ``results.jsonl``, flushed batch by batch;
4. write ``report.md`` and ``rouge.png`` from all rows and print the tables.

Resume: ``run.json`` in the output folder records the run signature (model, data fingerprint, pool,
shots, seed, max_new_tokens, chat). Re-running with the same ``--out`` and the same signature skips
every (experiment, example id) already in ``results.jsonl``; a different signature is an error that
names the changed settings (use a new ``--out``). Adding experiments or raising ``--limit`` is not a
change of signature: the new rows are generated, the finished ones reused. ``--batch-size`` is not
part of the signature either: greedy rows do not depend on it beyond float rounding, and sampled rows
draw from a generator seeded per example from (seed, example id), not per batch.
Interrupted (Ctrl-C), the batches already written stay; ``LabInterrupted`` says how to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from lmlab.errors import ConfigError, DataError
from lmlab.tasks.summarize import report as _report
from lmlab.tasks.summarize.data import Dialogue, DialogueSet, load_dialogues, require_references
from lmlab.tasks.summarize.experiments import (
    INSTRUCTION, Experiment, check_shots, clean_summary, example_seed, generation_config, parse_experiments, spec_hash,
)
from lmlab.tasks.summarize.rouge import n_words, score_example

# The model side (torch, lmlab.precision, lmlab.checkpoints, lmlab.generation, lmlab.prompting, lmlab.adapt,
# lmlab.align) is imported inside the functions that run a model, not here: `lmlab lab --help` reads
# DEFAULT_MODEL and DEFAULT_POOL_SIZE from this module, and building a command's parser imports no torch
# (1-10 s on a busy CPU; tests/test_cli.py checks it). Everything imported above is torch-free.

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_POOL_SIZE = 4
RESULTS = "results.jsonl"
RUN_FILE = "run.json"


@dataclass
class LabSettings:
    model: str = DEFAULT_MODEL
    data: str | None = None  # None: the bundled sample; a .jsonl/.csv path; "hf:ID[:SPLIT]"
    experiments: list[str] | str | None = None  # None: experiments.DEFAULT_EXPERIMENTS
    shots: int = 2  # K for few-shot / few-shot-nn
    shots_from: str | None = None  # a separate file of shots; None: the first pool_size records
    pool_size: int = DEFAULT_POOL_SIZE
    limit: int | None = None  # evaluate only the first N non-pool dialogues
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 48  # DialogSum summaries are 1-2 sentences (~20-40 tokens); see docs/lab.md for timing
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    out: str | Path = "lab-out"
    examples: int = 3  # human-vs-model examples printed and written to report.md
    max_prompt_tokens: int | None = None  # None: the model's context minus max_new_tokens
    max_rows: int | None = None  # testing knob: stop (as if Ctrl-C) once this many new rows are written
    precision: str = "auto"  # lmlab.precision: auto (bf16 where native, else fp32), fp32 or bf16
    adapter: str | Path | None = None  # LoRA adapter of the "finetuned" experiment; None: the one lmlab ships
    reward: str | Path | None = None  # reward model (lmlab reward train): best-of-n experiments need it; every row gets its score
    quantize: str | None = None  # lmlab.quant: int8, int4[-gG] or native (a GGUF at its own precision); None: float
    turns: bool = True  # report.html shades each fine-tuned row's dialogue turns by its summary's attention
    student: str | Path | None = None  # the bundle of the "student" experiment; None: the one lmlab ships for model
    # decoding settings (GenerationConfig fields: num_beams, length_penalty, no_repeat_ngram_size, min_new_tokens)
    # for the greedy adapter and student experiments, on top of their recipe's own; None: the recipe's
    decoding: dict | None = None
    # the same experiments' number of summaries: N > 1 samples N and keeps the consensus (minimum Bayes risk), 1
    # writes one (the recipe's `generation`); None: as the recipe says. `temperature`: of those samples (None:
    # the recipe's `mbr` temperature, else 0.7)
    best_of: int | None = None
    temperature: float | None = None
    device: str = "auto"  # auto (cuda when available) | cpu | cuda


class LabInterrupted(KeyboardInterrupt):
    """Ctrl-C (or ``max_rows``) during generation; every row written so far is kept."""

    def __init__(self, out: Path, rows_written: int, rows_total: int):
        super().__init__(f"interrupted: {rows_written} row(s) of this run are saved in {out / RESULTS} "
                         f"({rows_total} in total); run the same command again with --out {out} to resume")
        self.out, self.rows_written, self.rows_total = out, rows_written, rows_total


@dataclass
class LabResult:
    out: Path
    summaries: list[_report.ExperimentSummary]
    rows: list[dict]  # the rows reported (selected experiments x evaluated examples)
    new_rows: int  # rows generated by this invocation
    seconds: float  # wall time of this invocation
    text: str  # what was printed to the terminal
    skipped: list[str] = field(default_factory=list)


# --- preparation ---------------------------------------------------------------------------------
def split_pool(data: DialogueSet, settings: LabSettings) -> tuple[list[Dialogue], list[Dialogue], str]:
    """(shot pool, evaluated records, pool description); the two never share a dialogue."""
    if settings.limit is not None and settings.limit < 1:
        raise ConfigError(f"--limit {settings.limit} must be >= 1")
    if settings.shots_from:
        pool_set = load_dialogues(settings.shots_from)
        evaluated = data.records[:settings.limit]
        # never a dialogue's own shot: pool dialogues that are also in --data are left out (all of --data,
        # not only the --limit evaluated, so the pool does not change when --limit grows on resume)
        data_texts = {r.dialogue for r in data.records}
        pool = [p for p in pool_set.records if p.dialogue not in data_texts]
        dropped = len(pool_set.records) - len(pool)
        where = f"{pool_set.source} ({len(pool)} dialogues" + (f"; {dropped} also in --data left out)" if dropped else ")")
    else:
        if settings.pool_size < 0:
            raise ConfigError(f"--pool-size {settings.pool_size} must be >= 0")
        if settings.pool_size >= len(data.records):
            raise DataError(f"--pool-size {settings.pool_size} leaves nothing to evaluate: {data.source} holds "
                            f"{len(data.records)} dialogues; lower --pool-size or pass --shots-from FILE")
        pool, evaluated = data.records[:settings.pool_size], data.records[settings.pool_size:][:settings.limit]
        where = f"first {len(pool)} dialogues of {data.source}"
    return pool, evaluated, where


def _signature(settings: LabSettings, data: DialogueSet, pool_desc: str, chat: bool) -> dict:
    """What a row's content depends on; rows of a different signature must never be mixed."""
    sig = {
        "model": settings.model,
        "data": data.source,
        "data_fingerprint": data.fingerprint,
        "shot_pool": pool_desc,
        "shots": settings.shots,
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "max_prompt_tokens": settings.max_prompt_tokens,
        "chat": chat,
    }
    if settings.shots_from:
        sig["shots_from_fingerprint"] = load_dialogues(settings.shots_from).fingerprint
    import torch

    from lmlab.precision import resolve_precision

    if resolve_precision(settings.precision) != torch.float32 and not settings.quantize:  # bf16 rows are others
        sig["precision"] = "bf16"
    if settings.quantize:  # quantized weights give other rows too
        sig["quantize"] = settings.quantize
    return sig


def _sig_hash(sig: dict) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]


def _check_out_dir(out: Path, sig: dict) -> list[dict]:
    """Read back finished rows; refuse an output folder that holds a run with other settings."""
    run_file = out / RUN_FILE
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{run_file} is not valid JSON; delete {out} or pass another --out") from None
        if old != sig:
            changed = [f"{k}: {old.get(k)!r} -> {sig.get(k)!r}" for k in sorted(set(old) | set(sig))
                       if old.get(k) != sig.get(k)]
            raise ConfigError(f"--out {out} holds results of a run with different settings ({'; '.join(changed)}); "
                              f"pass a new --out DIR, or delete {out} to start over")
    rows: list[dict] = []
    path = out / RESULTS
    if path.exists():
        want = _sig_hash(sig)
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # a last line cut short by a hard kill: drop it, regenerate that row
                    path.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
                    break
                raise DataError(f"{path}:{lineno}: not valid JSON; delete {out} or pass another --out") from None
            if row.get("run") != want:
                raise ConfigError(f"{path}:{lineno}: row from a run with different settings (run {row.get('run')!r}, "
                                  f"this run {want!r}); pass a new --out DIR")
            rows.append(row)
    return rows


def _resolve_chat(settings: LabSettings, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.chat is None:
        return has_template
    if settings.chat and not has_template:
        raise ConfigError(f"--chat: the tokenizer of {settings.model!r} has no chat template; use --no-chat")
    return settings.chat


def _resolve_device(name: str) -> str:
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {name!r} must be auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def _uses_recipe_decoding(experiment: Experiment) -> bool:
    """The greedy adapter and student experiments decode as their recipe says (beams, length penalty, ...)."""
    return (experiment.adapter or experiment.student) and experiment.best_of == 1 and not experiment.samples


MBR_TEMPERATURE = 0.7  # the samples' temperature of --best-of N when the recipe has no `mbr` of its own


def _with_recipe_mbr(experiment: Experiment, recipe, overrides: dict | None, best_of: int | None = None,
                     temperature: float | None = None) -> Experiment:
    """An adapter or student experiment that decodes by minimum Bayes risk becomes a best-of-n experiment of
    that many samples: where its recipe says so (``mbr``) and neither ``--best-of 1`` nor ``--num-beams`` & co.
    choose otherwise, or where ``--best-of N`` asks for it (the recipe's sampling settings, else T=0.7;
    ``--temperature`` on top). Unchanged when the experiment asks for one summary (``finetuned-greedy``)."""
    if experiment.single or not _uses_recipe_decoding(experiment) or best_of == 1:
        return experiment
    mbr = getattr(recipe, "mbr", None) if recipe is not None else None
    if best_of is None and (not mbr or any(v is not None for v in (overrides or {}).values())):
        return experiment
    sampling = recipe.mbr_sampling if mbr else {"do_sample": True, "temperature": MBR_TEMPERATURE}
    if temperature is not None:
        sampling = {**sampling, "temperature": temperature}
    return dataclasses.replace(experiment, generation=sampling, best_of=best_of or recipe.mbr_samples, select="mbr")


def _check_best_of(settings: LabSettings) -> None:
    """--best-of N / --temperature T of the fine-tuned experiments: one-line errors before anything loads."""
    n, t = settings.best_of, settings.temperature
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"--best-of {n!r} must be an integer >= 1 (1: one summary; N > 1: the consensus of N)")
    if n is not None and n > 1 and any(v is not None for v in (settings.decoding or {}).values()):
        raise ConfigError(f"--best-of {n} samples its summaries; --num-beams & co. decode one: choose one")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
        raise ConfigError(f"--temperature {t!r} must be > 0 (the temperature of --best-of N's samples)")
    if t is not None and n is not None and n == 1:
        raise ConfigError("--temperature sets the samples of --best-of N (N > 1); --best-of 1 writes one greedy summary")


def _decoding(recipe, overrides: dict | None) -> dict:
    """The recipe's decoding settings with ``--num-beams`` & co. on top (validated: a one-line error)."""
    from lmlab.generation import GenerationConfig

    settings = {**(recipe.generation if recipe is not None else {}),
                **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return GenerationConfig.check_settings(settings, "decoding of the fine-tuned experiments")


# --- generation ----------------------------------------------------------------------------------
def _generate(model, tokenizer, prompts: list[str], config) -> list[tuple[str, int]]:
    """One batched generation -> (text, number of generated tokens) per prompt.

    Like ``lmlab.generation.generate`` (left-padded batch, special tokens skipped, stop strings trimmed),
    but through ``generate_tokens`` so the token count is exact rather than a re-encoding of the text.
    Tests wrap this seam to count calls.
    """
    from lmlab.generation import generate_tokens
    from lmlab.generation.decode import encode_prompts, resolve_config, trim_stop_strings

    config = resolve_config(model, config, tokenizer)
    ids, mask = encode_prompts(tokenizer, prompts)  # (B, T), left-padded; special tokens as the tokenizer says
    new = generate_tokens(model, ids, mask, config, tokenizer=tokenizer)
    return [(trim_stop_strings(tokenizer.decode(row, skip_special_tokens=True), config.stop_strings), len(row))
            for row in new]


def _resolve_adapter(settings: LabSettings, experiments: list[Experiment]) -> tuple[Path | None, str | None]:
    """The adapter directory of the adapter experiments and a short hash of its weights (None, None if unused)."""
    if not any(e.adapter for e in experiments):
        return None, None
    from lmlab.adapt.peft import WEIGHTS_FILE, read_adapter_config
    from lmlab.adapt.recipe import RECIPE_FILE, shipped_adapter

    names = ", ".join(e.name for e in experiments if e.adapter)
    model_dir = Path(str(settings.model))
    if settings.adapter is None and (model_dir / RECIPE_FILE).exists():
        # a fully fine-tuned model (lmlab finetune --method full): the model itself is the fine-tuned one
        return None, "model:" + hashlib.sha256((model_dir / RECIPE_FILE).read_bytes()).hexdigest()[:12]
    if settings.adapter is not None:
        path = Path(settings.adapter)
    else:
        path = shipped_adapter(settings.model)
        if path is None:
            raise ConfigError(f"experiment(s) {names} need a LoRA adapter: lmlab ships one only for "
                              f"smollm2-135m-instruct, not {settings.model!r}; pass --adapter DIR (from lmlab finetune) "
                              f"or leave {names} out of --experiments")
    read_adapter_config(path)  # a clear error now, before any generation
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise ConfigError(f"--adapter {str(path)!r} has no {WEIGHTS_FILE}")
    return path, hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def _resolve_student(settings: LabSettings, experiments: list[Experiment]) -> tuple[Path | None, str | None]:
    """The student bundle of the student experiments and a short hash of its files (None, None if unused)."""
    if not any(e.student for e in experiments):
        return None, None
    from lmlab.adapt.recipe import SHIPPED, resolve_student
    from lmlab.adapt.student import bundle_id, read_bundle

    path = resolve_student(settings.student if settings.student is not None else SHIPPED, settings.model)
    read_bundle(path)  # a clear error now, before any generation
    return path, bundle_id(path)


def _adapter_recipe(adapter: Path | None, chat: bool):
    """The prompt recipe saved with the adapter or fine-tuned model (lmlab finetune writes it); the lab's
    instruction recipe otherwise."""
    if adapter is None:
        return None
    from lmlab.adapt.recipe import Recipe

    return Recipe.load(adapter) or Recipe(template="instruction", instruction=INSTRUCTION, chat=chat,
                                          prompt_field="dialogue", response_field="summary")


class _PromptBuilder:
    """Builds an experiment's prompt for one dialogue: shots from the pool, then lmlab.prompting."""

    def __init__(self, pool: list[Dialogue], tokenizer, chat: bool, k: int, seed: int, max_prompt_tokens: int | None,
                 recipe=None):
        from lmlab.prompting import Example

        self.recipe = recipe  # the adapter's prompt recipe, for adapter experiments
        self.specs: dict[str, str] = {}  # experiment name -> spec hash stored in its rows
        self.pool = [Example(p.dialogue, p.references[0]) for p in pool]
        self.pool_ids = [p.id for p in pool]
        self.tokenizer, self.chat, self.k, self.seed = tokenizer, chat, k, seed
        self.max_prompt_tokens = max_prompt_tokens
        self._embedder = None

    def embedder(self):
        if self._embedder is None:
            from lmlab.prompting import SentenceEmbedder

            self._embedder = SentenceEmbedder("all-minilm-l6-v2")
        return self._embedder

    def __call__(self, experiment: Experiment, record: Dialogue):
        from lmlab.prompting import build_prompt, select_shots

        if experiment.adapter or experiment.student:  # exactly the prompt the adapter (student) was trained on
            return self.recipe.prompt(record.dialogue, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens)
        k = experiment.n_shots(self.k)
        shots = []
        if k:
            embedder = self.embedder() if experiment.shot_method == "nearest" else None
            shots = select_shots(record.dialogue, self.pool, k, method=experiment.shot_method,
                                 seed=example_seed(self.seed, record.id), embedder=embedder)
        return build_prompt(record.dialogue, shots, template=experiment.template, tokenizer=self.tokenizer,
                            chat=self.chat, instruction=experiment.instruction(),
                            max_prompt_tokens=self.max_prompt_tokens)


def _shot_ids(prompt, pool_builder: _PromptBuilder) -> list[str]:
    ids = []
    for shot in getattr(prompt, "shots", []) or []:
        for ex, ident in zip(pool_builder.pool, pool_builder.pool_ids):
            if ex.input == getattr(shot, "input", None):
                ids.append(ident)
                break
    return ids


# --- the lab -------------------------------------------------------------------------------------
def run_lab(settings: LabSettings, echo: Callable[[str], None] = print, progress: bool = True) -> LabResult:
    """Run (or resume) the lab and write results.jsonl, report.md and rouge.png under settings.out."""
    t_start = time.perf_counter()
    experiments = parse_experiments(settings.experiments)
    _check_best_of(settings)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(settings, name)} must be >= 1")

    # 1. data, pool and shots: all checked before the model is even loaded
    data = load_dialogues(settings.data)
    for msg in data.skipped:
        echo(f"warning: {msg}")
    if not data.records:
        skipped = f" ({len(data.skipped)} records skipped, see the warnings above)" if data.skipped else ""
        raise DataError(f"--data {data.source} holds no dialogues{skipped}; give a DialogSum .jsonl or a .csv with "
                        f"a dialogue column")
    pool, evaluated, pool_desc = split_pool(data, settings)
    if not evaluated:
        raise DataError(f"{data.source}: no dialogues to evaluate")
    require_references(evaluated, data.source)
    if any(e.n_shots(settings.shots) for e in experiments):
        check_shots(experiments, settings.shots, len(pool), pool_desc)
        require_references(pool, f"the shot pool ({pool_desc})")

    # 2. model and tokenizer; the adapter; the run signature; finished rows
    from lmlab.checkpoints import load_model, load_tokenizer

    adapter, adapter_id = _resolve_adapter(settings, experiments)
    reward_id = _resolve_reward(settings, experiments)
    student, student_id = _resolve_student(settings, experiments)
    device = _resolve_device(settings.device)
    tokenizer = load_tokenizer(settings.model)
    chat = _resolve_chat(settings, tokenizer)
    out = Path(settings.out)
    sig = _signature(settings, data, pool_desc, chat)
    done_rows = _check_out_dir(out, sig)
    recipe_dir = adapter if adapter is not None else (Path(str(settings.model)) if adapter_id else None)
    recipe = _adapter_recipe(recipe_dir, chat)
    student_recipe = _adapter_recipe(student, chat) if student is not None else None
    chosen = [_with_recipe_mbr(e, student_recipe if e.student else recipe, settings.decoding, settings.best_of,
                               settings.temperature) for e in experiments]
    if settings.temperature is not None and all(c is e for c, e in zip(chosen, experiments)):
        raise ConfigError(f"--temperature {settings.temperature} sets the samples of the fine-tuned experiments' "
                          "minimum Bayes risk, and none of these experiments samples: add --best-of N")
    experiments = chosen
    decodings = {e.name: _decoding(student_recipe if e.student else recipe, settings.decoding)
                 for e in experiments if _uses_recipe_decoding(e)}
    specs = {e.name: spec_hash(e, adapter_id, reward_id, student_id, decoding=decodings.get(e.name))
             for e in experiments}
    for row in done_rows:
        if row["experiment"] in specs and row.get("spec") != specs[row["experiment"]]:
            raise ConfigError(f"{out / RESULTS} holds {row['experiment']!r} rows from an earlier definition of that "
                              f"experiment (spec {row.get('spec')!r}, now {specs[row['experiment']]!r}); "
                              f"pass a new --out DIR")
    done = {(r["experiment"], r["id"]): r for r in done_rows}
    todo = [(e, r) for e in experiments for r in evaluated if (e.name, r.id) not in done]
    echo(f"lab: {len(experiments)} experiment(s) x {len(evaluated)} dialogues from {data.source}; "
         f"shot pool: {pool_desc}; {len(todo)} to generate, {len(experiments) * len(evaluated) - len(todo)} done")

    new_rows = 0
    scorer = model = None
    if settings.reward is not None:
        from lmlab.align.reward import RewardScorer

        scorer = RewardScorer.load(settings.reward, batch_size=settings.batch_size)
    if todo:
        from lmlab.precision import apply_precision

        # the lab's model serves every experiment but "student", which runs on the student bundle, loaded apart
        runs = []  # (model, tokenizer, prompt builder, [(experiment, record, prompt)])
        main_todo = [(e, r) for e, r in todo if not e.student]
        if main_todo:
            # adapters are switched off outside "finetuned"
            model = load_model(settings.model, adapter=adapter, quantize=settings.quantize).to(device)
            if adapter is not None:
                echo(f"adapter: {adapter} (used by: {', '.join(e.name for e in experiments if e.adapter)})")
            echo(f"precision: {apply_precision(model, settings.precision)}")  # as lmlab generate/summarize say it
            runs.append((model, tokenizer, recipe, main_todo))
        student_todo = [(e, r) for e, r in todo if e.student]
        if student_todo:
            student_model = load_model(student, quantize=settings.quantize).to(device)
            echo(f"student: {student} ({student_model.config.n_layers} layers; used by: "
                 f"{', '.join(e.name for e in experiments if e.student)}); precision: "
                 f"{apply_precision(student_model, settings.precision)}")
            student_tokenizer = load_tokenizer(student)
            runs.append((student_model, student_tokenizer, student_recipe, student_todo))
        for name, decoding in decodings.items():
            if decoding and any(e.name == name for e, _ in todo):
                echo(f"decoding of {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(decoding.items())))
        # every prompt is built (shots chosen, budget fitted) before the first token is generated, so a
        # prompt that cannot be built is an error now, not halfway through the run
        built = []
        for run_model, run_tokenizer, recipe, items in runs:
            max_prompt = settings.max_prompt_tokens
            if max_prompt is None:
                max_prompt = max(16, run_model.config.max_seq_len - settings.max_new_tokens)
            builder = _PromptBuilder(pool, run_tokenizer, chat, settings.shots, settings.seed, max_prompt,
                                     recipe=recipe)
            builder.specs = specs
            built.append((run_model, run_tokenizer, builder, [(e, r, builder(e, r)) for e, r in items]))
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(sig, indent=2, sort_keys=True) + "\n")
        for run_model, run_tokenizer, builder, items in built:
            left = None if settings.max_rows is None else settings.max_rows - new_rows
            run_settings_ = settings if left is None else dataclasses.replace(settings, max_rows=left)
            try:
                new_rows += _generate_rows(items, run_model, run_tokenizer, builder, run_settings_, chat, out,
                                           _sig_hash(sig), done, progress, scorer)
            except LabInterrupted as exc:  # rows written by the runs before this one count too
                raise LabInterrupted(out, new_rows + exc.rows_written, exc.rows_total) from None

    # 3. report from all rows of the selected experiments and evaluated dialogues
    out.mkdir(parents=True, exist_ok=True)
    names = [e.name for e in experiments]
    rows = [done[(e, r.id)] for e in names for r in evaluated if (e, r.id) in done]
    summaries = [_report.summarize_rows([r for r in rows if r["experiment"] == e.name], e.name, e.description)
                 for e in experiments]
    rewards = _mean_rewards(rows, evaluated, names, scorer) if scorer is not None else {}
    multi_ref = any(len(r.references) > 1 for r in evaluated)
    aggregations = ["best", "mean"] if multi_ref else ["best"]
    run_settings = {
        "model": settings.model, "data": f"{data.source} ({len(evaluated)} evaluated)", "shot pool": pool_desc,
        "shots (few-shot K)": settings.shots, "seed": settings.seed, "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size, "chat template": chat,
    }
    if adapter is not None:
        run_settings["adapter (finetuned)"] = f"{adapter} ({adapter_id})"
    if student is not None:
        run_settings["student"] = f"{student} ({student_id})"
    if settings.quantize:
        run_settings["quantize"] = settings.quantize
    for name, decoding in decodings.items():
        if decoding:
            run_settings[f"decoding ({name})"] = ", ".join(f"{k}={v}" for k, v in sorted(decoding.items()))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    _report.write_report_md(out / "report.md", summaries=summaries,
                            examples_md=_report.examples_text(evaluated, done, names, settings.examples, markdown=True),
                            settings=run_settings, aggregations=aggregations, date=date, skipped=data.skipped)
    _report.plot_rouge(out / "rouge.png", summaries, "best",
                       title=f"ROUGE on {data.source} ({len(evaluated)} dialogues), {settings.model}")
    turns, turn_seconds = {}, 0.0
    shade = settings.turns and any(e.adapter for e in experiments)
    if shade:
        t_turns = time.perf_counter()
        tuned = [r for r in rows if r["experiment"] in {e.name for e in experiments if e.adapter}]
        turns = _turn_shading(tuned, {r.id: r for r in evaluated}, out, model, tokenizer, settings, adapter, echo)
        turn_seconds = time.perf_counter() - t_turns
    _report.write_report_html(out / "report.html", summaries=summaries, settings=run_settings, date=date,
                              records=evaluated, rows_by_key=done, experiments=names, turns=turns)
    elapsed = time.perf_counter() - t_start
    parts = []
    if settings.examples:
        parts += ["", _report.examples_text(evaluated, done, names, settings.examples)]
    for agg in aggregations:
        parts += ["", f"ROUGE F x100, {_report.AGGREGATION_TEXT[agg]}:", _report.scores_table(summaries, agg)]
    if rewards:
        line = f"mean reward-model score ({settings.reward}): " + ", ".join(f"{e} {v:.3f}" for e, v in rewards.items())
        parts += ["", line]
        with open(out / "report.md", "a", encoding="utf-8") as f:
            f.write(f"\n{line}\n")
    if shade:
        parts += ["", f"turn shading: {len(turns)} fine-tuned row(s) in {turn_seconds:.1f} s "
                      f"({100 * turn_seconds / elapsed:.0f}% of this run)"]
    parts += ["", f"{new_rows} new row(s) in {elapsed:.1f} s; wrote {out / 'report.md'}, {out / 'report.html'}, "
                  f"{out / RESULTS}, {out / 'rouge.png'}"]
    text = "\n".join(parts)
    echo(text)
    return LabResult(out=out, summaries=summaries, rows=rows, new_rows=new_rows, seconds=elapsed, text=text,
                     skipped=data.skipped)


def _resolve_reward(settings: LabSettings, experiments: list[Experiment]) -> str | None:
    """A short hash of the reward model's head and config (None without --reward); best-of-n experiments need one."""
    names = ", ".join(e.name for e in experiments if e.best_of > 1 and e.select == "reward")
    if settings.reward is None:
        if names:
            raise ConfigError(f"experiment(s) {names} need a reward model: pass --reward DIR (from lmlab reward train)")
        return None
    from lmlab.align.reward import CONFIG_FILE, HEAD_FILE, RewardConfig

    path = Path(settings.reward)
    RewardConfig.load(path)  # a clear error now, before any generation
    digest = hashlib.sha256((path / CONFIG_FILE).read_bytes() + (path / HEAD_FILE).read_bytes())
    return digest.hexdigest()[:12]


def _mean_rewards(rows: list[dict], evaluated: list[Dialogue], names: list[str], scorer) -> dict[str, float]:
    """Mean reward-model score per experiment; rows written without --reward are scored now (not stored)."""
    dialogues = {r.id: r.dialogue for r in evaluated}
    missing = [r for r in rows if "reward" not in r]
    if missing:
        for r, score in zip(missing, scorer.score([dialogues[r["id"]] for r in missing], [r["summary"] for r in missing])):
            r["reward"] = score
    means = {}
    for name in names:
        scores = [r["reward"] for r in rows if r["experiment"] == name]
        if scores:
            means[name] = sum(scores) / len(scores)
    return means


TURNS = "turns.jsonl"  # the turn shading of fine-tuned rows (--turns), kept so that a resumed run reuses it


def _turn_shading(rows: list[dict], records: dict[str, Dialogue], out: Path, model, tokenizer, settings: LabSettings,
                  adapter: Path | None, echo) -> dict[tuple[str, str], dict]:
    """(experiment, id) -> lmlab.inspect.turns.turn_attention of each fine-tuned row (its prompt + summary,
    teacher-forced, with the adapter on), or {"error": why}; computed once per summary and cached in turns.jsonl."""
    from lmlab.inspect.turns import turn_attention

    cache: dict[tuple[str, str, str], dict] = {}
    if (out / TURNS).exists():
        for line in (out / TURNS).read_text(encoding="utf-8").splitlines():
            if line.strip():
                t = json.loads(line)
                cache[(t["experiment"], t["id"], t["summary"])] = t
    result, todo = {}, []
    for row in rows:
        hit = cache.get((row["experiment"], row["id"], row["summary"]))
        if hit is not None:
            result[(row["experiment"], row["id"])] = hit
        else:
            todo.append(row)
    if not todo:
        return result
    if model is None:  # a resumed run with nothing left to generate
        from lmlab.checkpoints import load_model
        from lmlab.precision import apply_precision

        model = load_model(settings.model, adapter=adapter, quantize=settings.quantize).to(_resolve_device(settings.device))
        if not settings.quantize:
            apply_precision(model, settings.precision)
    echo(f"turn shading: {len(todo)} fine-tuned row(s)")
    with open(out / TURNS, "a", encoding="utf-8") as f:
        for row in todo:
            key = {"experiment": row["experiment"], "id": row["id"], "summary": row["summary"]}
            try:
                t = {**key, **turn_attention(model, tokenizer, row["prompt"], row["summary"], records[row["id"]].dialogue)}
            except DataError as exc:
                t = {**key, "error": str(exc)}
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
            result[(row["experiment"], row["id"])] = t
    return result


def _generate_rows(todo, model, tokenizer, builder: _PromptBuilder, settings: LabSettings, chat: bool, out: Path,
                   run_hash: str, done: dict, progress: bool = True, scorer=None) -> int:
    """Generate the pending rows batch by batch, appending each batch to results.jsonl as it finishes.

    A best-of-n experiment samples n summaries per dialogue and keeps the one `scorer` (the reward
    model) scores highest; with a scorer every row also stores the reward of its summary.
    """
    from lmlab.adapt.lora import lora_disabled

    written = 0
    bar = tqdm(total=len(todo), desc="lab", unit="summary", disable=not progress)
    try:
        with open(out / RESULTS, "a", encoding="utf-8") as f:
            experiments = {e.name: e for e, _, _ in todo}  # in order of first appearance
            for experiment in experiments.values():
                items = [(r, p) for e, r, p in todo if e.name == experiment.name]
                bar.set_description(experiment.name)
                for i in range(0, len(items), settings.batch_size):
                    batch = [r for r, _ in items[i:i + settings.batch_size]]
                    prompts = [p for _, p in items[i:i + settings.batch_size]]
                    row_chat = builder.recipe.chat if experiment.adapter or experiment.student else chat
                    config = generation_config(experiment, settings.max_new_tokens, settings.seed, row_chat,
                                               example_ids=[r.id for r in batch])  # sampled: a seed per row
                    if _uses_recipe_decoding(experiment):  # the recipe's beams, length penalty, ... (or --num-beams)
                        config = config.replace(**_decoding(builder.recipe, settings.decoding))
                    t0 = time.perf_counter()
                    picked = None
                    with contextlib.nullcontext() if experiment.adapter else lora_disabled(model):
                        if experiment.best_of > 1:
                            from lmlab.align.best_of_n import best_of_n

                            judge = scorer
                            if experiment.select == "mbr":
                                from lmlab.align.mbr import MBRScorer

                                judge = MBRScorer()
                            picked = best_of_n(model, tokenizer, [p.text for p in prompts],
                                               [r.dialogue for r in batch], experiment.best_of, config, judge,
                                               seeds=config.seed, clean=clean_summary)
                            outputs = [(b.text, b.tokens[b.index]) for b in picked]
                        else:
                            outputs = _generate(model, tokenizer, [p.text for p in prompts], config)
                    rewards = ([b.score for b in picked] if picked is not None and experiment.select == "reward" else
                               scorer.score([r.dialogue for r in batch], [clean_summary(o) for o, _ in outputs])
                               if scorer is not None else None)
                    seconds = time.perf_counter() - t0
                    row_seeds = config.seed if isinstance(config.seed, list) else [config.seed] * len(batch)
                    for i, (record, prompt, (output, n_generated), row_seed) in enumerate(
                            zip(batch, prompts, outputs, row_seeds)):
                        summary = clean_summary(output)
                        row = {
                            "experiment": experiment.name, "id": record.id, "run": run_hash,
                            "spec": builder.specs[experiment.name],
                            "prompt": prompt.text, "output": output, "summary": summary,
                            "references": record.references,
                            "scores": score_example(summary, record.references).to_dict(),
                            "words": n_words(summary), "prompt_tokens": prompt.n_tokens,
                            "generated_tokens": n_generated,
                            "shots": _shot_ids(prompt, builder),
                            "dropped_shots": len(getattr(prompt, "dropped_shots", []) or []),
                            "truncated_query": bool(getattr(prompt, "truncated_query", False)),
                            "seconds": seconds / len(batch), "batch_seconds": seconds, "batch_size": len(batch),
                            "generation": {**{k: v for k, v in asdict(config).items()
                                              if k in ("do_sample", "temperature", "top_k", "top_p",
                                                       "repetition_penalty")}, "seed": row_seed},
                        }
                        if rewards is not None:
                            row["reward"] = rewards[i]
                        if picked is not None:  # every candidate and its score; `summary` is the kept one
                            key = "reward" if experiment.select == "reward" else "mbr"  # mbr: mean ROUGE vs the rest
                            row["candidates"] = [{"summary": c, key: r}
                                                 for c, r in zip(picked[i].candidates, picked[i].scores)]
                            row["generated_tokens"] = sum(picked[i].tokens)  # the cost of all n samples
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        done[(experiment.name, record.id)] = row
                    f.flush()
                    os.fsync(f.fileno())
                    written += len(batch)
                    bar.update(len(batch))
                    if settings.max_rows is not None and written >= settings.max_rows:
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        raise LabInterrupted(out, written, len(done)) from None
    bar.close()
    return written
