"""Alignment with preference pairs: Direct Preference Optimization (DPO) of a LoRA policy, in the one loop.

``align(config)`` loads the base model, folds the starting adapter (a supervised fine-tune, e.g. the
DialogSum summarizer lmlab ships) into the base weights *in memory*, puts a fresh LoRA on top, and trains
it with the ``DirectPreference`` objective: ``build`` does the above and ``lmlab.training.job.run_job`` the
rest (resume, identity, ``loop.fit`` with its checkpoints, exact resume, signals, progress, metrics.jsonl
and loss.png; the best/final saves; the final ROUGE as the job's ``finish`` step; summary.json).

Why merge first: DPO needs the *starting* policy as a frozen reference. With the starting adapter
folded in, the model with its (new) adapters switched off is exactly that policy, so the reference costs
one extra forward pass under ``no_grad`` per pair and no second copy of the weights. Caching the
reference log-probabilities once per pair would cost the same forward passes for one epoch and more
bookkeeping (a cache to invalidate when the data, prompt or starting adapter changes); on the fly the
reference is always the one this run starts from, on resume too (the merge is recomputed, bit for bit).

The result is saved as *one* PEFT adapter for the base model: the starting adapter and the DPO adapter
stacked (``stack``: ranks r1 + r2, A = [A1; A2], B = [s1 B1, s2 B2], scale 1), which equals
W + s1 B1 A1 + s2 B2 A2 exactly. ``lmlab lab --adapter``, ``summarize`` and ``serve`` load it like any
adapter; its ``lmlab_recipe.json`` is the starting adapter's prompt recipe, so inference builds the prompt
the pairs were trained with.

Each pair's prompt is the *task input* (``lmlab.align.prefs``): the prompt recipe (the starting adapter's,
else the task preset) writes the model prompt. A prompt longer than the model's context window is an
error naming the record; within the window, a prompt that does not fit ``data.max_seq_len`` with its
longer response is cut in the dialogue's middle, as in fine-tuning and inference.

Evaluation during training: DPO loss, implicit-reward accuracy and margins on held-out pairs (a
``data.validation`` file, else ``data.holdout`` pairs held out of the training file, whole prompts at a
time). After the last step: ROUGE of greedy summaries on ``data.rouge`` (e.g. DialogSum dev records
400:500), with the fine-tuning job's evaluation.

Run directory::

    OUT/best/, OUT/final/   the stacked adapter (PEFT format) + lmlab_recipe.json
    OUT/checkpoint.pt       resume state (only the DPO adapter's parameters)
    OUT/metrics.jsonl, OUT/loss.png, OUT/run_config.json, OUT/summary.json

Config (YAML or JSON; every field can be overridden with ``--set section.key=value``)::

    base_model: smollm2-135m-instruct
    adapter: shipped                  # the starting policy: shipped | null (the base) | a PEFT adapter directory
    method: dpo
    beta: 0.1
    lora: {r: 16, alpha: 32, dropout: 0.05, targets: [q, k, v, o, gate, up, down]}
    data:
      train: prefs.jsonl              # preference pairs (lmlab.align.prefs)
      validation: null                # held-out pairs file; null: hold out `holdout` pairs of train
      holdout: 32
      rouge: {path: ../shared/data/dialogsum/dev.jsonl, records: "400:500"}   # final ROUGE; null: none
      task: dialogsum                 # prompt preset when the starting adapter has no recipe
      max_seq_len: 768
    eval: {rouge_examples: 24, max_new_tokens: 64, batch_size: 4, select: null, patience: null}
    train: {epochs: 1, batch_size: 1, grad_accum: 8, lr: 5e-5, ...}
    out_dir: runs/dpo
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lmlab
from lmlab.adapt.lora import LoraConfig, apply_lora, lora_modules, merge_lora
from lmlab.adapt.peft import check_savable, load_adapter, save_adapter
from lmlab.adapt.recipe import Recipe, shipped_adapter
from lmlab.align.prefs import read_preferences
from lmlab.errors import ConfigError, DataError, choices_error
from lmlab.objectives.dpo import DirectPreference
from lmlab.training import distributed as dist
from lmlab.training.config import (EvalSection, FinetuneSection, LoraSection, _deep_merge, _section, apply_overrides,
                                   check_eval, check_lora, read_config_file)
from lmlab.training.job import Built, JobSpec, run_job
from lmlab.training.metrics import MetricsLog
from lmlab.training.sft_data import (TASKS, check_source, eval_set, evaluate_sft, filler, read_pairs,
                                     resolve_recipe)

METHODS = ("dpo",)


# --- config ----------------------------------------------------------------------------------
@dataclass
class AlignData:
    train: str | None = None  # preferences JSONL
    validation: str | None = None  # held-out preferences JSONL
    holdout: int = 32  # pairs held out of `train` when there is no validation file (0: none)
    rouge: dict | None = None  # {path, records}: labelled records for the final ROUGE (never trained on)
    task: str | None = "dialogsum"
    template: str | None = None
    instruction: str | None = None
    chat: str | bool = "auto"
    prompt_field: str | None = None  # of the ROUGE records
    response_field: str | None = None
    max_seq_len: int = 768


@dataclass
class AlignConfig:
    base_model: str = "smollm2-135m-instruct"
    adapter: str | None = None  # the starting policy's adapter: "shipped", a directory, or None (the base)
    method: str = "dpo"
    beta: float = 0.1
    lora: LoraSection = field(default_factory=LoraSection)
    data: AlignData = field(default_factory=AlignData)
    eval: EvalSection = field(default_factory=lambda: EvalSection(batch_size=4, select=None))
    train: FinetuneSection = field(default_factory=lambda: FinetuneSection(
        lr=5e-5, warmup_steps=5, weight_decay=0.0, beta2=0.999, eval_every=25, ckpt_every=25, log_every=1,
        batch_size=1, grad_accum=8, epochs=1.0))
    out_dir: str = "runs/dpo"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AlignConfig":
        default = cls().to_dict()
        merged = _deep_merge(default, data)
        unknown = sorted(set(merged) - set(default))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(default))}")
        return cls(base_model=str(merged["base_model"]), adapter=merged["adapter"], method=merged["method"],
                   beta=merged["beta"], lora=_section(LoraSection, merged["lora"], "lora"),
                   data=_section(AlignData, merged["data"], "data"), eval=_section(EvalSection, merged["eval"], "eval"),
                   train=_section(FinetuneSection, merged["train"], "train"), out_dir=str(merged["out_dir"]))


def load_align_config(source: str | Path | None, overrides: list[str] | None = None) -> AlignConfig:
    """An AlignConfig from a YAML/JSON file with ``--set`` overrides applied."""
    data: dict[str, Any] = {}
    if source is not None:
        if not Path(source).exists():
            raise ConfigError(f"alignment config {str(source)!r} does not exist")
        data = read_config_file(Path(source))
    return AlignConfig.from_dict(apply_overrides(data, overrides or []))


def validate(cfg: AlignConfig) -> None:
    """Every setting and file that can be checked without loading a model (``run_job`` checks ``train``)."""
    if cfg.method not in METHODS:
        raise choices_error("method", cfg.method, METHODS)
    if not isinstance(cfg.beta, (int, float)) or not cfg.beta > 0:
        raise ConfigError(f"beta={cfg.beta!r} must be a number > 0 (typical values 0.05-0.5)")
    check_lora(cfg.lora)
    check_eval(cfg.eval)
    if not cfg.data.train:
        raise ConfigError("data.train is empty; give the preference pairs, e.g. --prefs prefs.jsonl")
    for key in ("train", "validation"):
        path = getattr(cfg.data, key)
        if path and not Path(path).is_file():
            raise DataError(f"data.{key}: preferences file {str(path)!r} does not exist")
    if cfg.data.rouge:
        check_source(cfg.data.rouge, "data.rouge")
    if cfg.data.holdout < 0:
        raise ConfigError(f"data.holdout={cfg.data.holdout!r} must be >= 0")
    if cfg.data.task is not None and cfg.data.task not in TASKS:
        raise choices_error("data.task", cfg.data.task, sorted(TASKS))
    if cfg.data.max_seq_len < 16:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too small (at least 16)")
    if cfg.train.label_smoothing or cfg.train.neftune_alpha:
        raise ConfigError(f"train.label_smoothing={cfg.train.label_smoothing!r} / train.neftune_alpha="
                          f"{cfg.train.neftune_alpha!r} apply to supervised fine-tuning, not to {cfg.method}; set them to 0")
    resolve_adapter(cfg.adapter, cfg.base_model)


# --- the starting policy -------------------------------------------------------------------------
def resolve_adapter(name: str | None, base_model: str) -> Path | None:
    """``shipped`` -> the adapter lmlab ships for `base_model`; a directory -> itself; None -> no adapter."""
    if name in (None, "", "none", "null"):
        return None
    if name == "shipped":
        path = shipped_adapter(base_model)
        if path is None:
            raise ConfigError(f"adapter=shipped: lmlab ships no adapter for {base_model!r}; give a directory")
        return path
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(f"adapter {name!r} is not a directory (a PEFT LoRA adapter, e.g. from lmlab finetune)")
    return path


@dataclass
class FoldedAdapter:
    """A LoRA adapter that was folded into the base weights: per module (A, B, scale), to stack it on save."""

    r: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def fold_adapter(model: nn.Module, directory: Path) -> FoldedAdapter:
    """Attach the adapter in `directory`, keep a copy of its matrices, merge it into the weights (in place)."""
    config = load_adapter(model, directory)
    modules = {name: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(), m.scaling)
               for name, m in lora_modules(model)}
    merge_lora(model)
    return FoldedAdapter(config.r, modules)


@contextlib.contextmanager
def stacked(model: nn.Module, first: FoldedAdapter):
    """Inside the block every LoRALinear holds `first` and its own adapter as one adapter at scale 1.

    Ranks r1 + r2: A = [A1; A2] (r1+r2, I), B = [s1 B1, s2 B2] (O, r1+r2), so B A = s1 B1 A1 + s2 B2 A2,
    the sum of both updates. A module `first` did not adapt gets zero rows/columns there.
    """
    saved = []
    try:
        for name, m in lora_modules(model):
            A2, B2 = m.lora_A.weight.detach(), m.lora_B.weight.detach()
            if name in first.modules:
                A1, B1, s1 = first.modules[name]
            else:
                A1, B1, s1 = A2.new_zeros(first.r, A2.shape[1]), B2.new_zeros(B2.shape[0], first.r), 0.0
            A = torch.cat([A1.to(A2), A2], dim=0)  # (r1 + r2, I)
            B = torch.cat([s1 * B1.to(B2), m.scaling * B2], dim=1)  # (O, r1 + r2)
            lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False, device=A.device, dtype=A.dtype)
            lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False, device=B.device, dtype=B.dtype)
            with torch.no_grad():
                lora_A.weight.copy_(A)
                lora_B.weight.copy_(B)
            saved.append((m, m.lora_A, m.lora_B, m.r, m.scaling))
            m.lora_A, m.lora_B, m.r, m.scaling = lora_A, lora_B, A.shape[0], 1.0
        yield
    finally:
        for m, lora_A, lora_B, r, scaling in saved:
            m.lora_A, m.lora_B, m.r, m.scaling = lora_A, lora_B, r, scaling


def save_policy(model: nn.Module, directory: Path, base_model: str, lora: LoraConfig, first: FoldedAdapter | None,
                recipe: Recipe) -> None:
    """The policy as one PEFT adapter for the base model (the starting adapter stacked under DPO's) + recipe."""
    if first is None:
        save_adapter(model, directory, lora, base_model=base_model)
    else:
        r = first.r + lora.r
        with stacked(model, first):  # alpha = r: scale 1, the scales are folded into B
            save_adapter(model, directory, LoraConfig(r=r, alpha=float(r), dropout=lora.dropout, targets=lora.targets),
                         base_model=base_model)
    recipe.save(directory)


# --- data ------------------------------------------------------------------------------------
@dataclass
class TokenizedPair:
    where: str  # "file:line"
    prompt_text: str  # the task input, to keep a prompt's pairs on one side of the holdout split
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool


def tokenize_preferences(pairs, path: str, recipe: Recipe, tokenizer, max_seq_len: int,
                         context: int) -> list[TokenizedPair]:
    """Preference pairs -> ids: the prompt as generation encodes it, each response + end of sequence.

    A prompt longer than the model's context window is an error naming the record; a prompt that fits
    the window but not `max_seq_len` (with its longer response) is cut in the middle, as fine-tuning does.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-sequence token; the policy could never learn to stop")
    lead = "" if recipe.chat else " "  # plain templates end at "Summary:"; the answer follows a space
    budget = min(max_seq_len, context)
    out = []
    for pair in pairs:
        where = f"{path}:{pair.line}"
        full = len(tokenizer.encode(recipe.prompt(pair.prompt, tokenizer).text, add_special_tokens=True))
        if full >= context:
            raise DataError(f"{where}: the prompt is {full} tokens, longer than the model's context window of "
                            f"{context} tokens (no room for a response); shorten it or drop the record")
        chosen = (tokenizer.encode(lead + pair.chosen) + [eos])[: budget // 2]  # at most half the budget
        rejected = (tokenizer.encode(lead + pair.rejected) + [eos])[: budget // 2]
        try:
            prompt = recipe.prompt(pair.prompt, tokenizer, max_prompt_tokens=budget - max(len(chosen), len(rejected)))
        except DataError as exc:
            raise DataError(f"{where}: the pair does not fit data.max_seq_len={max_seq_len} even with its prompt "
                            f"cut ({exc}); raise data.max_seq_len") from None
        ids = tokenizer.encode(prompt.text, add_special_tokens=True)
        out.append(TokenizedPair(where, pair.prompt, ids, chosen, rejected, prompt.truncated_query))
    return out


def split_holdout(pairs: list[TokenizedPair], n: int, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train, held out): about `n` pairs held out, whole prompts at a time (a dialogue is never on both sides)."""
    if n <= 0:
        return pairs, []
    prompts = list(dict.fromkeys(p.prompt_text for p in pairs))
    random.Random(seed).shuffle(prompts)
    held: set[str] = set()
    count = 0
    for text in prompts:
        if count >= n:
            break
        held.add(text)
        count += sum(p.prompt_text == text for p in pairs)
    train = [p for p in pairs if p.prompt_text not in held]
    if not train:
        raise ConfigError(f"data.holdout={n} leaves no training pairs (the file has {len(pairs)}); lower it")
    return train, [p for p in pairs if p.prompt_text in held]


class PairBatches:
    """Shuffled micro-batches of preference pairs, a fresh seeded order each epoch; (epoch, position) is the state.

    Under data parallelism rank r takes pairs r, r + world, ... of each batch; a rank left without any
    runs a ``filler`` (its first pair with every label ignored: it counts for nothing)."""

    def __init__(self, pairs: list[TokenizedPair], objective: DirectPreference, batch_size: int, seed: int,
                 env: dist.DistEnv):
        if not pairs:
            raise DataError("no preference pairs to train on")
        self.pairs, self.objective, self.batch_size, self.seed = pairs, objective, batch_size, seed
        self.rank, self.world = env.rank, env.world_size
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[TokenizedPair]]:
        order = list(self.pairs)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def next_micro_batches(self, step: int, n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(n):
            if self.position >= len(self._batches):
                self.epoch, self.position = self.epoch + 1, 0
                self._batches = self._epoch_batches(self.epoch)
            batch = self._batches[self.position]
            self.position += 1
            mine = batch[self.rank::self.world]
            out.append(self._collate(mine) if mine else filler(self._collate(batch[:1])))
        return out

    def _collate(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return self.objective.collate([(p.prompt, p.chosen, p.rejected) for p in pairs])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)


# --- evaluation ------------------------------------------------------------------------------
def evaluate_pairs(model, objective: DirectPreference, pairs: list[TokenizedPair], batch_size: int,
                   env: dist.DistEnv) -> dict[str, float]:
    """Held-out pairs: mean DPO loss, implicit-reward accuracy and margin, chosen/rejected log-ratios."""
    sums: dict[str, float] = {}
    mine = pairs[env.rank::env.world_size]
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        batch = objective.collate([(p.prompt, p.chosen, p.rejected) for p in part])
        batch = {k: v.to(env.device) for k, v in batch.items()}
        for name, value in objective.stats(model, batch).sums().items():
            sums[name] = sums.get(name, 0.0) + value
    n = dist.all_reduce_sum(len(mine), env)
    return {f"val_{name}": dist.all_reduce_sum(sums.get(name, 0.0), env) / max(n, 1)
            for name in ("dpo_loss", "reward_accuracy", "reward_margin", "chosen_logratio", "rejected_logratio")}


# --- the job ---------------------------------------------------------------------------------
def align(cfg: AlignConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the alignment job `cfg` -> summary dict (steps, metrics, final ROUGE, paths)."""
    validate(cfg)
    # beta first, so a resume with another beta names it
    identity = {"beta": float(cfg.beta),
                "align_config": {k: v for k, v in cfg.to_dict().items() if k not in ("train", "beta")},
                "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("stop_after", "device")}}
    spec = JobSpec(cfg.out_dir, cfg.train, cfg.to_dict(), identity, resume, show_progress)
    return run_job(spec, lambda env: build(cfg, env, show_progress))


def read_pairs_file(path: str, key: str) -> list:
    """The preference pairs of data.`key`; a file without any is an error naming it."""
    pairs = read_preferences(path)
    if not pairs:
        raise DataError(f"data.{key}: {str(path)!r} holds no preference pairs (one JSON object per line: "
                        f"prompt, chosen, rejected)")
    return pairs


def build(cfg: AlignConfig, env: dist.DistEnv, show_progress: bool = True) -> Built:
    """The starting policy with a fresh LoRA on top, the tokenized pairs, held-out pairs and ROUGE records."""
    d, t = cfg.data, cfg.train
    adapter_dir = resolve_adapter(cfg.adapter, cfg.base_model)
    train_pairs = read_pairs_file(d.train, "train")
    val_file_pairs = read_pairs_file(d.validation, "validation") if d.validation else None

    # 1. the starting policy: the base with its adapter folded in (this is also the reference)
    tokenizer = lmlab.load_tokenizer(cfg.base_model)
    model = lmlab.load_model(cfg.base_model).to(env.device)
    first = fold_adapter(model, adapter_dir) if adapter_dir is not None else None
    recipe = ((Recipe.load(adapter_dir) if adapter_dir is not None else None)
              or resolve_recipe(d, tokenizer, cfg.eval.max_new_tokens, cfg.base_model))
    recipe.max_new_tokens = cfg.eval.max_new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = DirectPreference(model.config.arch, pad, cfg.beta, model.config.decoder_start_token_id)

    # 2. what trains: a fresh LoRA on the (merged) starting policy; refused now if it could not be saved
    torch.manual_seed(t.seed)
    lora = cfg.lora.to_lora()
    report = apply_lora(model, lora)
    if first is not None:
        missing = sorted(set(first.modules) - {name for name, _ in lora_modules(model)})
        if missing:
            raise ConfigError(f"lora.targets={list(lora.targets)} leaves out {missing[0]!r}, which the starting "
                              f"adapter adapts; the saved adapter stacks both, so adapt every module it does")
    check_savable(model)
    if env.is_main and show_progress:
        print(report)
    model.train()

    # 3. data: every pair tokenized up front (a bad record fails before any training)
    context = model.config.max_seq_len
    pairs = tokenize_preferences(train_pairs, d.train, recipe, tokenizer, d.max_seq_len, context)
    if val_file_pairs is not None:
        validation = tokenize_preferences(val_file_pairs, d.validation, recipe, tokenizer, d.max_seq_len, context)
    else:
        pairs, validation = split_holdout(pairs, d.holdout, t.seed)
    rouge = None
    if d.rouge and cfg.eval.rouge_examples:
        rouge_pairs = read_pairs(d.rouge, recipe, "data.rouge")[: cfg.eval.rouge_examples]
        rouge = eval_set(rouge_pairs, recipe, tokenizer, d.max_seq_len, cfg.eval.max_new_tokens)
    batches = PairBatches(pairs, objective, t.batch_size, t.seed, env)
    n_cut = sum(p.truncated for p in pairs + validation)

    def finish(summary: dict, wrapped) -> dict:
        """Fine-tuning's evaluation after training: ROUGE, empty and recited greedy summaries; into metrics.jsonl."""
        if rouge is None:
            return {}
        model.eval()
        with torch.no_grad():
            metrics = evaluate_sft(model, objective.sft, rouge, tokenizer, cfg.eval, env)
        model.train()
        metrics["examples"] = float(len(rouge.examples))
        if env.is_main:
            MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", fresh=False).write(kind="rouge", step=summary["step"],
                                                                               **metrics)
        return {"rouge": metrics}

    start = f"{cfg.base_model} + {adapter_dir}" if adapter_dir is not None else cfg.base_model
    return Built(
        name=f"dpo · {cfg.base_model}", model=model, objective=objective, batches=batches,
        save=lambda directory, metrics=None: save_policy(model, directory, cfg.base_model, lora, first, recipe),
        evaluate=(lambda m: evaluate_pairs(m, objective, validation, cfg.eval.batch_size, env)) if validation else None,
        select=cfg.eval.select, patience=cfg.eval.patience, trainable_only=True, finish=finish,
        announce=lambda: (f"dpo (beta {cfg.beta}) from {start}: {len(pairs)} training pairs, {len(validation)} held-out "
                          f"pairs ({n_cut} prompts cut in the middle to fit data.max_seq_len={d.max_seq_len}), "
                          f"{t.steps} steps of {t.batch_size} x {t.grad_accum} pairs; reference: the starting policy "
                          f"(adapters off)"),
        summary={"method": cfg.method, "beta": cfg.beta, "train_pairs": len(pairs), "heldout_pairs": len(validation),
                 "truncated_prompts": n_cut, "trainable_parameters": report.trainable})
