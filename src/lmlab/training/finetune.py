"""Supervised fine-tuning (full or LoRA) of a pretrained model on (prompt, response) pairs, in the one loop.

``finetune(config)`` loads the base model and its tokenizer, optionally wraps target linears in LoRA,
builds prompts with ``lmlab.prompting`` (the same builder the lab and ``lmlab summarize`` use, so the
prompt at inference is the prompt the model was trained on), and hands a ``Job`` to ``loop.fit``:
AdamW + warm-up/cosine, accumulation, clipping, atomic checkpoints, exact resume, signals, progress,
metrics.jsonl and loss.png all come from there. During training it measures the validation loss and
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
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import ConfigError, DataError, choices_error
from lmlab.adapt.recipe import Recipe
from lmlab.jsonl import iter_objects
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.training import distributed as dist
from lmlab.training.config import TrainSection, _deep_merge, _section, apply_overrides, read_config_file
from lmlab.training.loop import Job, check_identity, fit, read_resume_state

METHODS = ("lora", "full")

# task presets: which fields hold the prompt and the response, and how the prompt is written
TASKS: dict[str, dict[str, Any]] = {
    "dialogsum": {"prompt_field": "dialogue", "response_field": "summary", "template": "instruction",
                  "instruction": "Summarize the following dialogue in one or two sentences. "
                                 "Refer to the speakers as #Person1# and #Person2#."},
}


# --- config ----------------------------------------------------------------------------------
@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False


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
class EvalSection:
    rouge_examples: int = 24  # validation examples summarized with real generation at each evaluation (0: none)
    max_new_tokens: int = 64
    batch_size: int = 8
    select: str = "rouge1"  # metric that picks the best checkpoint; "-val_loss" for the lowest loss
    patience: int | None = None  # evaluations without improvement before stopping early


@dataclass
class FinetuneSection(TrainSection):
    epochs: float | None = None  # when set, steps = ceil(epochs * examples / (batch_size * grad_accum))


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
    if cfg.method not in METHODS:
        raise choices_error("method", cfg.method, METHODS)
    t = cfg.train
    for name in ("batch_size", "grad_accum", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)!r} must be >= 1")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr!r} must be > 0")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs!r} must be > 0")
    if cfg.data.task is not None and cfg.data.task not in TASKS:
        raise choices_error("data.task", cfg.data.task, sorted(TASKS))
    if not cfg.data.train:
        raise ConfigError("data.train is empty; give the training files, e.g. --set "
                          "'data.train=[{path: train.jsonl}]' or --data train.jsonl")
    if cfg.data.max_seq_len < 16:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too small (at least 16)")
    if cfg.eval.rouge_examples < 0 or cfg.eval.max_new_tokens < 1:
        raise ConfigError(f"eval.rouge_examples={cfg.eval.rouge_examples} must be >= 0 and eval.max_new_tokens="
                          f"{cfg.eval.max_new_tokens} >= 1")
    if cfg.data.chat not in ("auto", True, False):
        raise ConfigError(f"data.chat={cfg.data.chat!r} must be auto, true or false")


# --- data ------------------------------------------------------------------------------------
def resolve_recipe(cfg: FinetuneConfig, tokenizer) -> Recipe:
    task = TASKS.get(cfg.data.task or "", {})
    d = cfg.data
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    chat = has_chat if d.chat == "auto" else bool(d.chat)
    if chat and not has_chat:
        raise ConfigError(f"data.chat=true but the tokenizer of {cfg.base_model!r} has no chat template")
    prompt_field = d.prompt_field or task.get("prompt_field")
    response_field = d.response_field or task.get("response_field")
    if not prompt_field or not response_field:
        raise ConfigError("name the data fields: data.prompt_field and data.response_field (or data.task: dialogsum)")
    return Recipe(template=d.template or task.get("template", "instruction"),
                  instruction=d.instruction if d.instruction is not None else task.get("instruction"),
                  chat=chat, prompt_field=prompt_field, response_field=response_field,
                  max_new_tokens=cfg.eval.max_new_tokens)


def _record_range(spec: str | None, n: int, where: str) -> range:
    if spec in (None, "", "all"):
        return range(n)
    try:
        start, _, stop = str(spec).partition(":")
        return range(int(start or 0), min(int(stop) if stop else n, n))
    except ValueError:
        raise ConfigError(f"{where}: records={spec!r} must look like 'start:stop' (e.g. '0:400')") from None


def read_pairs(source: dict, recipe: Recipe, where: str) -> list[tuple[str, str, str]]:
    """(id, prompt text, response text) from one JSONL source ({path, records}); bad records are errors."""
    path = Path(source.get("path", ""))
    if not path.exists():
        raise DataError(f"{where}: data file {str(path)!r} does not exist")
    records = [obj for _, obj in iter_objects(path.read_text(encoding="utf-8").splitlines(), str(path))]
    pairs = []
    for i in _record_range(source.get("records"), len(records), where):
        obj = records[i]
        prompt, response = obj.get(recipe.prompt_field), obj.get(recipe.response_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{i + 1}: field {recipe.prompt_field!r} is missing or empty")
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{path}:{i + 1}: response field {recipe.response_field!r} is missing or empty")
        pairs.append((str(obj.get("fname", obj.get("id", f"{path.name}:{i + 1}"))), prompt.strip(), response.strip()))
    if not pairs:
        raise DataError(f"{where}: {str(path)!r} (records {source.get('records')!r}) holds no valid records")
    return pairs


@dataclass
class Tokenized:
    id: str
    prompt: list[int]
    response: list[int]
    truncated: bool


def tokenize_pairs(pairs, recipe: Recipe, tokenizer, max_seq_len: int) -> list[Tokenized]:
    """Prompt ids exactly as generation encodes them; response ids + end of sequence; long prompts cut in the middle."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-sequence token; the fine-tuned model could never stop")
    out = []
    for example_id, text, answer in pairs:
        lead = "" if recipe.chat else " "  # plain templates end at "Summary:"; the answer follows a space
        response = tokenizer.encode(lead + answer) + [eos]
        response = response[: max_seq_len // 2]  # a response never takes more than half the budget
        try:
            prompt = recipe.prompt(text, tokenizer, max_prompt_tokens=max_seq_len - len(response))
        except DataError as exc:
            raise DataError(f"example {example_id!r} does not fit data.max_seq_len={max_seq_len} even with its "
                            f"dialogue cut ({exc}); raise data.max_seq_len") from None
        ids = tokenizer.encode(prompt.text, add_special_tokens=True)
        out.append(Tokenized(example_id, ids, response, prompt.truncated_query))
    return out


class SFTBatches:
    """Length-bucketed, shuffled micro-batches of tokenized pairs, mixed across sources by weight; resumable.

    Each epoch is a seeded permutation of the (weighted) examples, cut into chunks of 32 batches; inside
    a chunk examples are sorted by length and batched, so a batch holds similar lengths (little padding)
    while the order still varies. Position (epoch, batch) is the whole state.
    """

    def __init__(self, sources: list[tuple[list[Tokenized], float]], objective: SupervisedFineTuning,
                 batch_size: int, seed: int, env: dist.DistEnv):
        self.sources, self.objective, self.batch_size, self.seed = sources, objective, batch_size, seed
        self.rank, self.world = env.rank, env.world_size
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[Tokenized]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        pool: list[Tokenized] = []
        for examples, weight in self.sources:
            whole, frac = int(weight), weight - int(weight)
            pool += examples * whole + rng.sample(examples, round(frac * len(examples)))
        rng.shuffle(pool)
        chunk = self.batch_size * 32
        batches = []
        for start in range(0, len(pool), chunk):
            part = sorted(pool[start:start + chunk], key=lambda e: len(e.prompt) + len(e.response))
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def next_micro_batches(self, step: int, n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(n):
            if self.position >= len(self._batches):
                self.epoch, self.position = self.epoch + 1, 0
                self._batches = self._epoch_batches(self.epoch)
            batch = self._batches[self.position][self.rank::self.world] or self._batches[self.position][:1]
            self.position += 1
            out.append(self.collate_examples(batch))
        return out

    def collate_examples(self, batch: list[Tokenized]) -> dict[str, torch.Tensor]:
        """One micro-batch of examples -> model inputs (a subclass may add tensors, e.g. distillation's)."""
        return self.objective.collate([(e.prompt, e.response) for e in batch])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)


# --- evaluation ------------------------------------------------------------------------------
def recited(summary: str) -> bool:
    """A summary holding a dialogue turn ("#Person1#: ..."): the model recited the dialogue instead of summarizing."""
    return re.search(r"#Person\d+#\s*:", summary) is not None


def evaluate_sft(model, objective: SupervisedFineTuning, examples: list[Tokenized], references: dict[str, str],
                 prompts: dict[str, str], tokenizer, cfg: FinetuneConfig, env: dist.DistEnv) -> dict[str, float]:
    """Validation loss over every validation example, and ROUGE of greedy summaries of the first few."""
    from lmlab.generation import GenerationConfig, generate
    from lmlab.tasks.summarize.rouge import corpus_score, score_example

    loss_sum = count = 0.0
    bs = cfg.eval.batch_size
    mine = examples[env.rank::env.world_size]
    for start in range(0, len(mine), bs):
        batch = objective.collate([(e.prompt, e.response) for e in mine[start:start + bs]])
        batch = {k: v.to(env.device) for k, v in batch.items()}
        loss, n = objective.loss(model, batch)
        loss_sum += loss.item() * int(n)
        count += int(n)
    metrics = {"val_loss": dist.all_reduce_sum(loss_sum, env) / max(dist.all_reduce_sum(count, env), 1)}
    chosen = examples[: cfg.eval.rouge_examples]
    if chosen:
        module = dist.unwrap(model)
        config = GenerationConfig(max_new_tokens=cfg.eval.max_new_tokens)
        summaries: list[str] = []
        for start in range(0, len(chosen), bs):
            part = chosen[start:start + bs]
            summaries += generate(module, tokenizer, [prompts[e.id] for e in part], config)
        scores = [score_example(s.strip(), references[e.id]) for s, e in zip(summaries, chosen)]
        metrics.update({k: v for k, v in corpus_score(scores).items() if k in ("rouge1", "rouge2", "rougeL")})
        metrics["empty"] = float(sum(not s.strip() for s in summaries))
        metrics["recited"] = float(sum(recited(s) for s in summaries))
    return metrics


# --- the job ---------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the fine-tuning job `cfg` -> summary dict (steps, losses, best metrics, paths)."""
    validate(cfg)
    with dist.session(cfg.train) as env:
        return _run(cfg, env, resume, show_progress)


def _run(cfg: FinetuneConfig, env: dist.DistEnv, resume: bool, show_progress: bool) -> dict:
    import lmlab
    from lmlab.adapt.lora import LoraConfig, apply_lora

    t, out = cfg.train, Path(cfg.out_dir)
    saved = read_resume_state(out, resume)
    identity = {"finetune_config": {k: v for k, v in cfg.to_dict().items() if k != "train"},
                "train": {k: v for k, v in dataclasses.asdict(t).items() if k not in ("stop_after", "device")}}
    if saved is not None:
        check_identity(saved, identity, out / "checkpoint.pt")

    # 1. the base model, its tokenizer, the prompt recipe
    tokenizer = lmlab.load_tokenizer(cfg.base_model)
    model = lmlab.load_model(cfg.base_model).to(env.device)
    recipe = resolve_recipe(cfg, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = SupervisedFineTuning(model.config.arch, pad, model.config.decoder_start_token_id)

    # 2. data: every source read, prompted and tokenized up front (errors before any training)
    sources, n_truncated, n_train = [], 0, 0
    for i, source in enumerate(cfg.data.train):
        weight = float(source.get("weight", 1.0))
        if weight <= 0:
            raise ConfigError(f"data.train[{i}].weight={weight} must be > 0")
        examples = tokenize_pairs(read_pairs(source, recipe, f"data.train[{i}]"), recipe, tokenizer, cfg.data.max_seq_len)
        n_truncated += sum(e.truncated for e in examples)
        n_train += len(examples)
        sources.append((examples, weight))
    validation, references, prompts = [], {}, {}
    if cfg.data.validation:
        val_pairs = read_pairs(cfg.data.validation, recipe, "data.validation")
        validation = tokenize_pairs(val_pairs, recipe, tokenizer, cfg.data.max_seq_len)
        references = {pid: answer for pid, _, answer in val_pairs}
        budget = cfg.data.max_seq_len - cfg.eval.max_new_tokens
        prompts = {pid: recipe.prompt(text, tokenizer, max_prompt_tokens=budget).text for pid, text, _ in val_pairs}
    batches = SFTBatches(sources, objective, t.batch_size, t.seed, env)
    if t.epochs is not None:
        t.steps = max(1, math.ceil(t.epochs * batches.batches_per_epoch / t.grad_accum))
    if env.is_main and show_progress:
        print(f"fine-tune {cfg.method} of {cfg.base_model}: {n_train} training pairs "
              f"({n_truncated} prompts cut in the middle to fit data.max_seq_len={cfg.data.max_seq_len}), "
              f"{len(validation)} validation pairs, {t.steps} steps of {t.batch_size} x {t.grad_accum}")

    # 3. what trains: LoRA adapters on a frozen base, or every weight
    torch.manual_seed(t.seed)
    lora = None
    if cfg.method == "lora":
        lora = LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                          rslora=cfg.lora.rslora)
        report = apply_lora(model, lora)
        if env.is_main and show_progress:
            print(report)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def save(directory: Path) -> None:
        _save_weights(model, directory, cfg, lora, recipe, tokenizer)

    job = Job(name=f"finetune {cfg.method} · {cfg.base_model}", model=model, objective=objective, batches=batches,
              evaluate=(lambda m: evaluate_sft(m, objective, validation, references, prompts, tokenizer, cfg, env))
              if validation else None,
              select=cfg.eval.select if validation else None, on_best=lambda step, metrics: save(out / "best"),
              patience=cfg.eval.patience, trainable_only=cfg.method == "lora", identity=identity)
    summary = fit(job, t, env, out, saved, show_progress)
    summary.pop("wrapped")
    if summary["finished"] and env.is_main:
        save(out / "final")
        if not (out / "best").exists():  # nothing selected (no validation data): the final weights are the best
            save(out / "best")
    summary.update(method=cfg.method, trainable_parameters=trainable, train_pairs=n_train, truncated_prompts=n_truncated,
                   best_dir=str(out / "best"), final_dir=str(out / "final"))
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    dist.barrier(env)
    return summary


def _save_weights(model, directory: Path, cfg: FinetuneConfig, lora, recipe: Recipe, tokenizer) -> None:
    """An adapter (PEFT format) for LoRA, a whole lmlab checkpoint for full fine-tuning; plus the recipe."""
    if lora is not None:
        from lmlab.adapt.peft import save_adapter

        save_adapter(model, directory, lora, base_model=cfg.base_model)
    else:
        from lmlab.checkpoints import save_model

        was_training = model.training
        save_model(model, directory, tokenizer)
        model.train(was_training)
    recipe.save(directory)
