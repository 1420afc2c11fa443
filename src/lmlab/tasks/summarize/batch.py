"""Summarize a whole file of dialogues into a JSONL file: ``lmlab summarize --data FILE --out OUT.jsonl``.

The lab scores summaries against references; this writes them for dialogues that have none (a user's own
archive, DialogSum's unlabeled hiddentest) — and so makes pseudo-labels for self-training: OUT is a
DialogSum-style JSONL (``fname``, ``dialogue``, ``summary``) that ``lmlab finetune --data`` reads back.

Each dialogue is summarized exactly as the lab's fine-tuned experiments summarize it: the prompt recipe
(``lmlab_recipe.json``, or the lab's instruction prompt), the lab's stop strings and ``clean_summary``,
and the recipe's decoding; with minimum Bayes risk every sample is seeded per dialogue
(``example_seed(seed, id)``), so a dev record's summary here is its row in ``lmlab lab``. Rows are appended
and fsynced batch by batch; a rerun skips the dialogues OUT already holds (a torn last line is dropped and
redone) and refuses a file written with other settings (each row carries them in ``settings``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from lmlab.errors import ConfigError, DataError
from lmlab.tasks.summarize.data import Dialogue
from lmlab.tasks.summarize.experiments import CHAT_STOP_STRINGS, STOP_STRINGS, clean_summary, example_seed


def read_done(path: Path, settings: dict) -> set[str]:
    """Ids already summarized in `path` with these `settings` (a torn last line is dropped)."""
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines()
    done: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # cut short by a kill: write the file back without it
                path.write_text("".join(kept + "\n" for kept in lines[:-1]), encoding="utf-8")
                break
            raise DataError(f"{path}:{lineno}: not valid JSON; delete {path} or pass another --out") from None
        if row.get("settings") != settings:
            raise ConfigError(f"{path} holds summaries written with other settings ({row.get('settings')!r}, now "
                              f"{settings!r}); pass another --out or delete it")
        done.add(row["fname"])
    return done


def summarize_file(model, tokenizer, prompt_of: Callable[[str], str], records: list[Dialogue], config, out: Path,
                   settings: dict, chat: bool, best_of: int = 1, seed: int = 0, batch_size: int = 8,
                   progress: bool = True, echo: Callable[[str], None] | None = print) -> int:
    """Summaries of `records` appended to `out` -> how many were written now.

    `prompt_of(dialogue)` renders a prompt; `config` is the decoding (sampled when `best_of` > 1: minimum Bayes
    risk over that many samples per dialogue); `settings` identify the run (adapter, decoding) in every row.
    """
    from lmlab.align.best_of_n import best_of_n
    from lmlab.align.mbr import MBRScorer
    from lmlab.generation import generate_tokens
    from lmlab.generation.decode import encode_prompts, resolve_config, trim_stop_strings

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"dialogue id {dup!r} appears more than once; ids must be unique to resume")
    done = read_done(out, settings)
    todo = [r for r in records if r.id not in done]
    if echo is not None:
        echo(f"summaries: {len(records)} dialogues, {len(records) - len(todo)} already in {out}, {len(todo)} to write")
    if not todo:
        return 0
    config = config.replace(stop_strings=list(config.stop_strings) + list(CHAT_STOP_STRINGS if chat else STOP_STRINGS))
    prompts = {r.id: prompt_of(r.dialogue) for r in todo}
    order = sorted(todo, key=lambda r: len(prompts[r.id]))  # similar lengths share a batch: little padding
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "a", encoding="utf-8") as f, \
            tqdm(total=len(order), desc="summarize", unit="dialogue", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            texts = [prompts[r.id] for r in batch]
            seeds = [example_seed(seed, r.id) for r in batch]
            if best_of > 1:
                picked = best_of_n(model, tokenizer, texts, [r.dialogue for r in batch], best_of, config,
                                   MBRScorer(), seeds=seeds, clean=clean_summary)
                rows = [{"summary": p.text, "generated_tokens": sum(p.tokens),
                         "candidates": [{"summary": c, "mbr": round(s, 6)} for c, s in zip(p.candidates, p.scores)]}
                        for p in picked]
            else:
                run = resolve_config(model, config.replace(seed=seeds if config.do_sample else config.seed), tokenizer)
                ids_, mask = encode_prompts(tokenizer, texts)
                new = generate_tokens(model, ids_, mask, run, tokenizer=tokenizer)
                rows = [{"summary": clean_summary(trim_stop_strings(tokenizer.decode(t, skip_special_tokens=True),
                                                                    run.stop_strings)),
                         "generated_tokens": len(t)} for t in new]
            for record, row in zip(batch, rows):
                f.write(json.dumps({"fname": record.id, "dialogue": record.dialogue, **row, "settings": settings},
                                   ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            bar.update(len(batch))
    return written
