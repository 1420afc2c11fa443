"""Supervised (prompt, response) data: reading, prompting, tokenizing, batching and evaluating it.

What fine-tuning, alignment (its final ROUGE), distillation and reward training share about text pairs:

* ``TASKS`` and ``resolve_recipe``: which fields hold the prompt and the response, and the prompt recipe
  (``lmlab.adapt.recipe.Recipe``: template, instruction, chat) that training and inference both use;
* ``read_pairs``: (id, prompt, response) from a JSONL source ``{path, records: "a:b"}``;
* ``tokenize_pairs``: prompt ids exactly as generation encodes them, the response + end of sequence,
  long prompts cut in the dialogue's middle;
* ``SFTBatches``: length-bucketed, shuffled, resumable micro-batches for ``loop.fit``;
* ``evaluate_sft``: validation loss and ROUGE of greedy summaries.

Functions take the config sections they read (``data``, ``eval``), never a whole job config.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.adapt.recipe import Recipe
from lmlab.errors import ConfigError, DataError
from lmlab.generation import GenerationConfig, generate
from lmlab.jsonl import iter_objects
from lmlab.objectives.base import IGNORE_INDEX
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.tasks.summarize.rouge import corpus_score, score_example
from lmlab.training import distributed as dist

# task presets: which fields hold the prompt and the response, and how the prompt is written
TASKS: dict[str, dict[str, Any]] = {
    "dialogsum": {"prompt_field": "dialogue", "response_field": "summary", "template": "instruction",
                  "instruction": "Summarize the following dialogue in one or two sentences. "
                                 "Refer to the speakers as #Person1# and #Person2#."},
}


# --- the prompt recipe -----------------------------------------------------------------------
def resolve_recipe(data, tokenizer, max_new_tokens: int, model_name: str) -> Recipe:
    """The prompt recipe from a data section (``task``, ``prompt_field``, ``response_field``, ``template``,
    ``instruction``, ``chat``) and the tokenizer of `model_name` (``chat: auto`` uses its chat template)."""
    task = TASKS.get(data.task or "", {})
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    chat = has_chat if data.chat == "auto" else bool(data.chat)
    if chat and not has_chat:
        raise ConfigError(f"data.chat=true but the tokenizer of {model_name!r} has no chat template")
    prompt_field = data.prompt_field or task.get("prompt_field")
    response_field = data.response_field or task.get("response_field")
    if not prompt_field or not response_field:
        raise ConfigError("name the data fields: data.prompt_field and data.response_field (or data.task: dialogsum)")
    return Recipe(template=data.template or task.get("template", "instruction"),
                  instruction=data.instruction if data.instruction is not None else task.get("instruction"),
                  chat=chat, prompt_field=prompt_field, response_field=response_field, max_new_tokens=max_new_tokens)


# --- reading ---------------------------------------------------------------------------------
def record_range(spec: str | None, n: int, where: str) -> range:
    """``"start:stop"`` (either side may be empty) | None | "all" -> the record indices of a file of `n` records."""
    if spec in (None, "", "all"):
        return range(n)
    try:
        start, _, stop = str(spec).partition(":")
        return range(int(start or 0), min(int(stop) if stop else n, n))
    except ValueError:
        raise ConfigError(f"{where}: records={spec!r} must look like 'start:stop' (e.g. '0:400')") from None


def check_source(source: dict, where: str) -> Path:
    """A data source ``{path, records}`` whose file exists and whose range parses (before any model loads)."""
    if not isinstance(source, dict):
        raise ConfigError(f"{where}={source!r} must be a mapping like {{path: train.jsonl, records: '0:400'}}")
    path = Path(str(source.get("path") or ""))
    if not path.is_file():
        raise DataError(f"{where}: data file {str(path)!r} does not exist")
    record_range(source.get("records"), 0, where)
    return path


def read_pairs(source: dict, recipe: Recipe, where: str) -> list[tuple[str, str, str]]:
    """(id, prompt text, response text) from one JSONL source ({path, records}); bad records are errors."""
    path = Path(source.get("path", ""))
    if not path.exists():
        raise DataError(f"{where}: data file {str(path)!r} does not exist")
    records = [obj for _, obj in iter_objects(path.read_text(encoding="utf-8").splitlines(), str(path))]
    pairs = []
    for i in record_range(source.get("records"), len(records), where):
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


# --- tokenizing ------------------------------------------------------------------------------
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


@dataclass
class EvalSet:
    """Labelled examples to evaluate on: tokenized, their references, and their generation prompts."""

    examples: list[Tokenized]
    references: dict[str, str]  # id -> reference response
    prompts: dict[str, str]  # id -> prompt text for generation (room left for max_new_tokens)


def eval_set(pairs, recipe: Recipe, tokenizer, max_seq_len: int, max_new_tokens: int) -> EvalSet:
    """``tokenize_pairs`` plus what ROUGE needs: the references and prompts that leave room to generate."""
    budget = max_seq_len - max_new_tokens
    return EvalSet(tokenize_pairs(pairs, recipe, tokenizer, max_seq_len), {pid: answer for pid, _, answer in pairs},
                   {pid: recipe.prompt(text, tokenizer, max_prompt_tokens=budget).text for pid, text, _ in pairs})


# --- batching --------------------------------------------------------------------------------
def filler(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch that runs the model but counts for nothing: every label ignored.

    A rank whose share of a batch is empty (more ranks than examples in it) still has to run forward and
    backward, or the others wait for it in the gradient all-reduce; with no label its count is 0, so the
    loop gives its loss zero weight and no example counts twice."""
    out = dict(batch)
    out["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    for key in ("hard", "kl_mask"):  # distillation's masks: nothing is scored either
        if key in out:
            out[key] = torch.zeros_like(out[key])
    return out


class SFTBatches:
    """Length-bucketed, shuffled micro-batches of tokenized pairs, mixed across sources by weight; resumable.

    Each epoch is a seeded permutation of the (weighted) examples, cut into chunks of 32 batches; inside
    a chunk examples are sorted by length and batched, so a batch holds similar lengths (little padding)
    while the order still varies. Position (epoch, batch) is the whole state. Under data parallelism
    rank r takes examples r, r + world, ... of each batch (a rank left without any runs a ``filler``).
    """

    def __init__(self, sources: list[tuple[list, float]], objective, batch_size: int, seed: int, env: dist.DistEnv):
        self.sources, self.objective, self.batch_size, self.seed = sources, objective, batch_size, seed
        self.rank, self.world = env.rank, env.world_size
        if not any(examples for examples, _ in sources):
            raise DataError("no training examples to batch")
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        pool: list = []
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
            batch = self._batches[self.position]
            self.position += 1
            mine = batch[self.rank::self.world]
            out.append(self.collate_examples(mine) if mine else filler(self.collate_examples(batch[:1])))
        return out

    def collate_examples(self, batch: list) -> dict[str, torch.Tensor]:
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


def evaluate_sft(model, objective: SupervisedFineTuning, data: EvalSet, tokenizer, eval_section,
                 env: dist.DistEnv) -> dict[str, float]:
    """Validation loss over every example of `data`, and ROUGE of greedy summaries of the first
    ``eval_section.rouge_examples`` (``batch_size`` and ``max_new_tokens`` are read from it too)."""
    loss_sum = count = 0.0
    bs = eval_section.batch_size
    mine = data.examples[env.rank::env.world_size]
    for start in range(0, len(mine), bs):
        batch = objective.collate([(e.prompt, e.response) for e in mine[start:start + bs]])
        batch = {k: v.to(env.device) for k, v in batch.items()}
        loss, n = objective.loss(model, batch)
        loss_sum += loss.item() * int(n)
        count += int(n)
    metrics = {"val_loss": dist.all_reduce_sum(loss_sum, env) / max(dist.all_reduce_sum(count, env), 1)}
    chosen = data.examples[: eval_section.rouge_examples]
    if chosen:
        module = dist.unwrap(model)
        config = GenerationConfig(max_new_tokens=eval_section.max_new_tokens)
        summaries: list[str] = []
        for start in range(0, len(chosen), bs):
            part = chosen[start:start + bs]
            summaries += generate(module, tokenizer, [data.prompts[e.id] for e in part], config)
        scores = [score_example(s.strip(), data.references[e.id]) for s, e in zip(summaries, chosen)]
        metrics.update({k: v for k, v in corpus_score(scores).items() if k in ("rouge1", "rouge2", "rougeL")})
        metrics["empty"] = float(sum(not s.strip() for s in summaries))
        metrics["recited"] = float(sum(recited(s) for s in summaries))
    return metrics
