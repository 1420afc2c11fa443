"""Teacher pseudo-labels: the teacher summarizes unlabeled inputs once, into a resumable JSONL cache.

Sequence-level distillation (Kim & Rush, 2016) trains the student on what the teacher *says*, not on
human references: the teacher generates a response for every unlabeled input and the student is
fine-tuned on those (input, teacher response) pairs. Generating is the expensive part (hundreds of
greedy decodes), so it is cached and resumable:

* ``OUT/pseudo_labels.jsonl``: a first line ``{"signature": {...}}`` (teacher, adapter hash, prompt
  recipe, generation settings), then one row per input, appended and fsynced batch by batch::

      {"key": "<sha256 of the input text, 16 hex>", "id": "train_12", "summary": "...", "generated_tokens": 31}

* rerunning after a kill generates only the inputs whose key is not in the file yet; a last line cut
  short by the kill is dropped and regenerated. A file written with another signature is refused
  (mixing two teachers' labels would be silent corruption).

The prompt is the adapter's recipe (``lmlab_recipe.json``) built exactly as the lab's ``finetuned``
experiment and ``lmlab summarize`` build it, with the lab's generation settings (greedy, its chat stop
strings, ``clean_summary``): the labels are the summaries the lab would score for the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from lmlab import generation
from lmlab.errors import ConfigError, DataError
from lmlab.tasks.summarize.experiments import EXPERIMENTS, clean_summary, generation_config

CACHE_FILE = "pseudo_labels.jsonl"


def text_key(text: str) -> str:
    """The cache key of an input: its content, so the same dialogue is labelled once whatever its file or index."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_cache(path: Path, signature: dict) -> dict[str, dict]:
    """Rows already generated, by key. Drops a torn last line (a kill mid-write); refuses another signature."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: dict[str, dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # written partly when the process died: regenerate that row
                path.write_text("".join(kept + "\n" for kept in lines[:-1]), encoding="utf-8")
                break
            raise DataError(f"{path}:{lineno}: not valid JSON; delete {path} to regenerate the pseudo-labels") from None
        if lineno == 1:
            if obj.get("signature") != signature:
                old = obj.get("signature") or {}
                changed = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
                raise ConfigError(f"{path} holds pseudo-labels of another teacher or prompt (differs in: "
                                  f"{', '.join(changed) or 'signature'}); delete it or choose another out_dir")
            continue
        rows[obj["key"]] = obj
    return rows


def generate_pseudo_labels(model, tokenizer, recipe, inputs: Sequence[tuple[str, str]], path: Path, signature: dict,
                           batch_size: int = 8, max_new_tokens: int = 64,
                           echo: Callable[[str], None] | None = print, progress: bool = True,
                           stop_after: int | None = None) -> dict[str, str]:
    """Teacher summaries of ``inputs`` [(id, text), ...] -> {key: summary}, through the cache at ``path``.

    Inputs are generated in batches of similar prompt length (left padding costs little then);
    each finished batch is appended and fsynced before the next starts. ``stop_after`` (a testing
    knob) stops after that many new rows, as a kill would.
    """
    if batch_size < 1:
        raise ConfigError(f"pseudo-label batch_size={batch_size} must be >= 1")
    done = read_cache(path, signature)
    todo: dict[str, tuple[str, str]] = {}
    for example_id, text in inputs:
        key = text_key(text)
        if key not in done and key not in todo:
            todo[key] = (example_id, text)
    if echo is not None:
        echo(f"pseudo-labels: {len(inputs)} inputs, {len(inputs) - len(todo)} already in {path}, "
             f"{len(todo)} to generate")
    if todo:
        # the lab's finetuned experiment: the adapter's recipe, greedy, its stop strings, the same prompt budget
        config = generation_config(EXPERIMENTS["finetuned"], max_new_tokens, seed=0, chat=recipe.chat)
        budget = max(16, model.config.max_seq_len - max_new_tokens)
        prompts = {key: recipe.prompt(text, tokenizer, max_prompt_tokens=budget).text for key, (_, text) in todo.items()}
        order = sorted(todo, key=lambda k: len(prompts[k]))  # similar lengths share a batch: less padding
        new = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f, \
                tqdm(total=len(order), desc="teacher pseudo-labels", unit="input", disable=not progress) as bar:
            if f.tell() == 0:
                f.write(json.dumps({"signature": signature}, sort_keys=True) + "\n")
            for start in range(0, len(order), batch_size):
                keys = order[start:start + batch_size]
                outputs = generation.generate(model, tokenizer, [prompts[k] for k in keys], config)
                for key, output in zip(keys, outputs):
                    row = {"key": key, "id": todo[key][0], "summary": clean_summary(output)}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[key] = row
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(keys))
                new += len(keys)
                if stop_after is not None and new >= stop_after:
                    break
    return {k: row["summary"] for k, row in done.items()}
