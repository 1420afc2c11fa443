"""Supervised fine-tuning (full or LoRA) of a pretrained model on (prompt, response) pairs, in the one loop.

``finetune(config)`` loads the base model and its tokenizer, optionally wraps target linears in LoRA,
builds prompts with ``lmlab.prompting`` (the same builder the lab and ``lmlab summarize`` use, so the
prompt at inference is the prompt the model was trained on): that is its ``build`` function, which
``lmlab.training.job.run_job`` runs in the one outline (resume, identity, run_config.json, ``loop.fit``,
best/final saves, summary.json). AdamW + warm-up/cosine, accumulation, clipping, atomic checkpoints,
exact resume, signals, progress, metrics.jsonl and loss.png all come from the loop. The data side
(reading, prompting, tokenizing, batching, evaluating pairs) is ``lmlab.training.sft_data``. During training it measures the validation loss and
ROUGE on a validation slice with real generation, keeps the best checkpoint by ``eval.select`` and
can stop early.

Run directory::

    OUT/best/           the best adapter (PEFT format) or full model (lmlab format) by eval.select
    OUT/final/          the weights at the last step
    OUT/checkpoint.pt   resume state (only the trainable parameters for LoRA)
    OUT/metrics.jsonl, OUT/loss.png, OUT/run_config.json, OUT/summary.json

Each saved model directory also holds ``lmlab_recipe.json``: the prompt recipe (template, instruction,
chat, max_new_tokens) that the lab's ``finetuned`` experiment and ``lmlab summarize`` apply.

Config (YAML or JSON; every field can be overridden with ``--set section.key=value``)::

    base_model: smollm2-135m-instruct
    method: lora                      # lora | full
    lora: {r: 16, alpha: 32, dropout: 0.05, targets: [q, k, v, o, gate, up, down], rslora: false}
    data:
      task: dialogsum                 # a preset for the fields and prompt (see TASKS), or null
      train: [{path: ../shared/data/dialogsum/dev.jsonl, records: "0:400", weight: 1.0}]
      validation: {path: ../shared/data/dialogsum/dev.jsonl, records: "400:500"}
      prompt_field: dialogue
      response_field: summary
      template: instruction           # lmlab.prompting template
      instruction: null               # null: the task's instruction
      chat: auto                      # use the tokenizer's chat template when it has one
      max_seq_len: 768                # prompt + response; longer prompts are cut in the dialogue's middle
    eval: {rouge_examples: 24, max_new_tokens: 64, select: rouge1, patience: null, batch_size: 8}
    train: {epochs: 2, batch_size: 8, lr: 2e-4, ...}   # lmlab.training.config.TrainSection + epochs
    out_dir: runs/finetune
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lmlab
from lmlab.adapt.lora import apply_lora
from lmlab.adapt.peft import check_savable, save_adapter
from lmlab.adapt.recipe import Recipe  # noqa: F401  (re-exported: serve/app.py imports it from here)
from lmlab.checkpoints import save_model
from lmlab.errors import ConfigError, choices_error
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.training import distributed as dist
from lmlab.training.config import (EvalSection, FinetuneSection, LoraSection, _deep_merge, _section, apply_overrides,
                                   check_eval, check_lora, read_config_file)
from lmlab.training.job import Built, JobSpec, run_job
from lmlab.training.sft_data import (TASKS, SFTBatches, check_source, eval_set, evaluate_sft, read_pairs,
                                     resolve_recipe, tokenize_pairs)

METHODS = ("lora", "full")


# --- config ----------------------------------------------------------------------------------
@dataclass
class FinetuneData:
    task: str | None = None
    train: list[dict] = field(default_factory=list)  # [{path, records: "a:b" | null, weight: 1.0}]
    validation: dict | None = None  # {path, records}
    prompt_field: str | None = None
    response_field: str | None = None
    template: str | None = None
    instruction: str | None = None
    chat: str | bool = "auto"
    max_seq_len: int = 768


@dataclass
class FinetuneConfig:
    base_model: str = "smollm2-135m-instruct"
    method: str = "lora"
    lora: LoraSection = field(default_factory=LoraSection)
    data: FinetuneData = field(default_factory=FinetuneData)
    eval: EvalSection = field(default_factory=EvalSection)
    train: FinetuneSection = field(default_factory=lambda: FinetuneSection(lr=2e-4, warmup_steps=10, weight_decay=0.0,
                                                                           beta2=0.999, eval_every=50, ckpt_every=50,
                                                                           log_every=1, batch_size=8))
    out_dir: str = "runs/finetune"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        default = cls().to_dict()
        merged = _deep_merge(default, data)
        known = set(default)
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(base_model=str(merged["base_model"]), method=merged["method"],
                   lora=_section(LoraSection, merged["lora"], "lora"),
                   data=_section(FinetuneData, merged["data"], "data"),
                   eval=_section(EvalSection, merged["eval"], "eval"),
                   train=_section(FinetuneSection, merged["train"], "train"), out_dir=str(merged["out_dir"]))


def load_finetune_config(source: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A FinetuneConfig from a YAML/JSON file with ``--set`` overrides applied."""
    data: dict[str, Any] = {}
    if source is not None:
        if not Path(source).exists():
            raise ConfigError(f"fine-tuning config {str(source)!r} does not exist")
        data = read_config_file(Path(source))
    return FinetuneConfig.from_dict(apply_overrides(data, overrides or []))


def validate(cfg: FinetuneConfig) -> None:
    """Every setting and file that can be checked without loading a model (``run_job`` checks ``train``)."""
    if cfg.method not in METHODS:
        raise choices_error("method", cfg.method, METHODS)
    if cfg.method == "lora":
        check_lora(cfg.lora)
    check_eval(cfg.eval)
    if cfg.data.task is not None and cfg.data.task not in TASKS:
        raise choices_error("data.task", cfg.data.task, sorted(TASKS))
    if not cfg.data.train:
        raise ConfigError("data.train is empty; give the training files, e.g. --set "
                          "'data.train=[{path: train.jsonl}]' or --data train.jsonl")
    for i, source in enumerate(cfg.data.train):
        check_source(source, f"data.train[{i}]")
        weight = source.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.train[{i}].weight={weight!r} must be a number > 0")
    if cfg.data.validation:
        check_source(cfg.data.validation, "data.validation")
    if cfg.data.max_seq_len < 16:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too small (at least 16)")
    if cfg.data.chat not in ("auto", True, False):
        raise ConfigError(f"data.chat={cfg.data.chat!r} must be auto, true or false")


# --- the job ---------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the fine-tuning job `cfg` -> summary dict (steps, losses, best metrics, paths)."""
    validate(cfg)
    identity = {"finetune_config": {k: v for k, v in cfg.to_dict().items() if k != "train"},
                "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("stop_after", "device")}}
    spec = JobSpec(cfg.out_dir, cfg.train, cfg.to_dict(), identity, resume, show_progress)
    return run_job(spec, lambda env: build(cfg, env, show_progress))


def build(cfg: FinetuneConfig, env: dist.DistEnv, show_progress: bool = True) -> Built:
    """The base model (LoRA-wrapped or fully trainable), the prompted and tokenized pairs, and how to save."""
    d, t = cfg.data, cfg.train
    tokenizer = lmlab.load_tokenizer(cfg.base_model)
    model = lmlab.load_model(cfg.base_model).to(env.device)
    recipe = resolve_recipe(d, tokenizer, cfg.eval.max_new_tokens, cfg.base_model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = SupervisedFineTuning(model.config.arch, pad, model.config.decoder_start_token_id,
                                     label_smoothing=t.label_smoothing, neftune_alpha=t.neftune_alpha)

    # what trains: LoRA adapters on a frozen base (refused now if they could not be saved), or every weight
    torch.manual_seed(t.seed)
    lora = None
    if cfg.method == "lora":
        lora = cfg.lora.to_lora()
        report = apply_lora(model, lora)
        check_savable(model)
        if env.is_main and show_progress:
            print(report)
    else:
        model.requires_grad_(True)
    model.train()

    # data: every source read, prompted and tokenized up front (errors before any training)
    sources = [(tokenize_pairs(read_pairs(source, recipe, f"data.train[{i}]"), recipe, tokenizer, d.max_seq_len),
                float(source.get("weight", 1.0))) for i, source in enumerate(d.train)]
    n_train = sum(len(examples) for examples, _ in sources)
    n_truncated = sum(e.truncated for examples, _ in sources for e in examples)
    validation = (eval_set(read_pairs(d.validation, recipe, "data.validation"), recipe, tokenizer, d.max_seq_len,
                           cfg.eval.max_new_tokens) if d.validation else None)
    batches = SFTBatches(sources, objective, t.batch_size, t.seed, env)
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)

    def save(directory: Path, metrics: dict | None = None) -> None:
        """An adapter (PEFT format) for LoRA, a whole lmlab checkpoint for full fine-tuning; plus the recipe."""
        if lora is not None:
            save_adapter(model, directory, lora, base_model=cfg.base_model)
        else:
            was_training = model.training
            save_model(model, directory, tokenizer)
            model.train(was_training)
        recipe.save(directory)

    n_val = len(validation.examples) if validation else 0
    return Built(
        name=f"finetune {cfg.method} · {cfg.base_model}", model=model, objective=objective, batches=batches, save=save,
        evaluate=(lambda m: evaluate_sft(m, objective, validation, tokenizer, cfg.eval, env)) if validation else None,
        select=cfg.eval.select, patience=cfg.eval.patience, trainable_only=lora is not None,
        announce=lambda: (f"fine-tune {cfg.method} of {cfg.base_model}: {n_train} training pairs ({n_truncated} "
                          f"prompts cut in the middle to fit data.max_seq_len={d.max_seq_len}), {n_val} validation "
                          f"pairs, {t.steps} steps of {t.batch_size} x {t.grad_accum}"),
        summary={"method": cfg.method, "trainable_parameters": trainable, "train_pairs": n_train,
                 "truncated_prompts": n_truncated})
