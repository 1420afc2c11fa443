"""Which dialogue turns a summary drew on: attention from the summary's tokens to each turn of the dialogue.

``turn_attention(model, tokenizer, prompt, summary, dialogue)`` runs a decoder once on ``prompt + summary``
(teacher-forced: the summary re-tokenized after its prompt) with a ``Recorder`` and measures, for each turn
(each non-empty line of `dialogue`, found inside `prompt`), the attention the summary's tokens pay to it:

    weight(turn) = mean over layers, heads and summary tokens of  sum over the turn's tokens of  w[query, key]

``mass`` is that weight (the share of all attention; the rest goes to the instruction, the template's special
tokens and the summary itself), ``share`` the same normalized over the turns so that it sums to 1 (the page shades
by it), ``per_token_share`` the mass divided by the turn's token count, normalized the same way (long turns
collect more attention in total; this shows where it is densest).
``summarize_turns`` generates the summary with the summarizer lmlab ships (the LoRA adapter and its prompt
recipe) and measures its turns.
"""

from __future__ import annotations

import torch

from lmlab.errors import DataError
from lmlab.inspect.record import Recorder

AVERAGING = "mean over all layers, all heads and all summary tokens of the attention summed over each turn's tokens"


def turn_spans(dialogue: str) -> list[tuple[int, int]]:
    """Character spans of the non-empty lines of `dialogue`."""
    spans, start = [], 0
    for line in dialogue.split("\n"):
        if line.strip():
            spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


@torch.no_grad()
def turn_attention(model, tokenizer, prompt: str, summary: str, dialogue: str) -> dict:
    """{"turns", "mass", "share", "summary", "averaging"} for a decoder (see the module docstring)."""
    if model.config.arch != "decoder":
        raise DataError(f"turn attention reads a decoder's attention from summary to prompt; this model has "
                        f"arch={model.config.arch!r}")
    where = prompt.find(dialogue)
    if where < 0:
        raise DataError("the dialogue does not appear verbatim in the prompt")
    if not summary.strip():
        raise DataError("summary='' : there is no summary to trace back to the dialogue")
    full = prompt + summary
    encoding = tokenizer.backend.encode(full, add_special_tokens=True)
    ids, offsets = encoding.ids, encoding.offsets
    if len(ids) > model.config.max_seq_len:
        raise DataError(f"prompt + summary is {len(ids)} tokens, longer than the model's window of "
                        f"{model.config.max_seq_len} tokens")
    queries = [i for i, (a, b) in enumerate(offsets) if a >= len(prompt) and b > a]
    with Recorder(model) as rec:
        model(torch.tensor([ids]), return_hidden=True)
    w = rec.stacked()["decoder"]  # (L, H, T, T)
    received = w[:, :, queries].mean(dim=(0, 1, 2))  # (T,) attention each key gets from an average summary token
    spans = turn_spans(dialogue)
    mass, density = [], []
    for s, e in spans:
        keys = [i for i, (a, b) in enumerate(offsets) if b > a and where + s <= a < where + e]
        mass.append(float(received[keys].sum()) if keys else 0.0)
        density.append(mass[-1] / max(1, len(keys)))
    total, dense_total = sum(mass) or 1.0, sum(density) or 1.0
    return {"turns": [dialogue[s:e] for s, e in spans], "mass": mass, "share": [m / total for m in mass],
            "per_token_share": [d / dense_total for d in density],
            "summary": summary, "summary_tokens": len(queries), "averaging": AVERAGING}


def require_summarizer(model_source: str):
    """The adapter directory of the summarizer lmlab ships for `model_source`, else a DataError naming it."""
    from lmlab.adapt.recipe import shipped_adapter

    adapter = shipped_adapter(str(model_source))
    if adapter is None:
        raise DataError(f"no fine-tuned summarizer ships for model {str(model_source)!r}; lmlab ships one for "
                        "smollm2-135m-instruct")
    return adapter


def summarize_turns(model_source: str, dialogue: str, max_new_tokens: int = 64) -> dict:
    """Summarize `dialogue` with the fine-tuned summarizer lmlab ships for `model_source`, then trace the
    summary back to the turns (``turn_attention`` with the adapter on)."""
    import lmlab
    from lmlab.adapt.recipe import Recipe
    from lmlab.generation import GenerationConfig
    from lmlab.prompting import summarize

    adapter = require_summarizer(model_source)
    recipe = Recipe.load(adapter)
    model = lmlab.load_model(model_source, adapter=adapter)
    tokenizer = lmlab.load_tokenizer(model_source)
    summary, prompt = summarize(dialogue.strip(), model, tokenizer, config=GenerationConfig(max_new_tokens=max_new_tokens),
                                template=recipe.template, chat=recipe.chat, instruction=recipe.instruction)
    out = turn_attention(model, tokenizer, prompt.text, summary, dialogue.strip())
    out["adapter"] = adapter.name
    return out
