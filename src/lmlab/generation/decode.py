"""Autoregressive decoding: the entry points, and the greedy / sampling loop over a preallocated KV cache.

Three entry points, from tokens to text:

* ``generate_tokens(model, input_ids, attention_mask, config)`` -> new token ids per row
* ``generate(model, tokenizer, prompts, config, **overrides)``   -> text (str in, str out; list in, list out)
* ``stream(model, tokenizer, prompt, config, **overrides)``       -> an iterator of text deltas (``streaming.py``)

How one generation runs (decoder-only; an encoder-decoder runs its encoder once and starts the
decoder from ``decoder_start_token_id``):

1. *prefill*: the whole prompt goes through the model once, filling the cache; only the last
   position's logits are computed (``logits_to_keep=1``). ``driver.py`` holds this model side.
2. *steps*: each new token goes through the model alone, reading the cached keys/values; the
   logits-processor chain (``processors.py``) shapes them, then greedy takes the argmax and sampling
   draws (``sample_steps`` here; ``beam_search.py`` for beams).
3. *stopping*: a row finishes on any eos id or stop string (``stopping.py``) and is padded from then on; once a
   quarter of the rows still running have finished, finished rows leave the batch (``cache.reorder``)
   so they stop costing compute. The loop ends when every row has finished (checked with the one
   host sync per step) or after ``max_new_tokens``.

On the CPU in fp32, batched generation (B * beams >= 4 rows) multiplies through weights pre-packed for
that many rows where a one-off, cached calibration measured that faster on this machine
(``lmlab.nn.packed.maybe_packed_linears``; the packed copies stay on the model for the next call; rows
that leave the batch are zero-padded back, not re-packed): MKL's sgemm otherwise re-packs each weight
on every skinny decode-step call. Tokens can differ from the unpacked path only by float rounding;
``LMLAB_PACKED_GEMM=0`` switches it off, ``=1`` forces it on even for one row.

Shapes: B batch (prompts), N beams, T prompt length, V vocabulary, L tokens so far.
"""


from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lmlab.errors import ConfigError
from lmlab.generation.beam_search import beam_search
from lmlab.generation.config import GenerationConfig
from lmlab.generation.driver import prepare_inputs, start_run
from lmlab.generation.processors import build_processors
from lmlab.generation.stopping import held_back_length as _held_back  # noqa: F401  (kept importable from here)
from lmlab.generation.stopping import stop_checker, trim_stop_strings
from lmlab.nn.packed import maybe_packed_linears


def resolve_config(model, config: GenerationConfig | None = None, tokenizer=None, **overrides: Any) -> GenerationConfig:
    """Apply overrides and fill eos / pad ids from the model config, then the tokenizer."""
    config = (config or GenerationConfig()).replace(**overrides) if overrides else (config or GenerationConfig())
    changes: dict[str, Any] = {}
    if config.eos_token_ids is None:
        eos = list(model.config.eos_token_ids)
        tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
        if tokenizer_eos is not None and tokenizer_eos not in eos:
            eos.append(tokenizer_eos)
        changes["eos_token_ids"] = eos
    if config.pad_token_id is None:
        eos = changes.get("eos_token_ids", config.eos_token_ids)
        for candidate in (model.config.pad_token_id, getattr(tokenizer, "pad_token_id", None), eos[0] if eos else None, 0):
            if candidate is not None:
                changes["pad_token_id"] = candidate
                break
    return config.replace(**changes) if changes else config


def sample_steps(model, input_ids, attention_mask, config: GenerationConfig, tokenizer=None, expand: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding, one step at a time: yields (tokens (B,), finished (B,)) per step.

    `expand` > 1: each prompt decodes as that many adjacent rows (B = prompts x expand) that share its prefill,
    e.g. best-of-n samples, each row with its own seed.

    A row's token at the step it finishes is its eos (or the token completing a stop string);
    after that it gets pad_token_id. Finished rows leave the batch (``cache.reorder``) once at least a
    quarter of the rows still decoded have finished, so they stop costing compute; the yielded
    tensors keep the full batch.
    """
    run, history = start_run(model, input_ids, attention_mask, config, expand=expand)
    B, L0 = history.shape
    device = history.device
    # token history preallocated for prompt + new tokens (the processors read a prefix of it)
    seq = torch.empty(B, L0 + config.max_new_tokens, dtype=torch.long, device=device)
    seq[:, :L0] = history
    chain = build_processors(config, prompt_len=L0, eos_token_ids=config.eos_token_ids)
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device) if config.eos_token_ids else None
    stop_check = stop_checker(tokenizer, config.stop_strings)
    generators = _generators(config.seed, B, device) if config.sampling else None  # one, or one per row
    active = torch.arange(B, device=device)  # (A,) original row of each row still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (A,)

    logits = run.prefill()
    for t in range(config.max_new_tokens):
        L = L0 + t
        scores = chain(seq[:, :L], logits.float()) if len(chain) else logits
        if generators is not None:
            tokens = _draw(scores.softmax(-1), generators)  # (A,)
        else:
            tokens = scores.argmax(-1)  # (A,)
        tokens = tokens.masked_fill(finished, config.pad_token_id)
        seq[:, L] = tokens
        done = finished.clone()
        if eos is not None:
            done |= torch.isin(tokens, eos)
        if stop_check is not None:
            done |= stop_check(seq[:, L0:L + 1], ~done)
        if len(active) == B:
            yield tokens, done
        else:  # scatter back into the full batch; rows that left are finished
            full = torch.full((B,), config.pad_token_id, dtype=torch.long, device=device)
            full_done = torch.ones(B, dtype=torch.bool, device=device)
            full[active], full_done[active] = tokens, done
            yield full, full_done
        finished = done
        n_done = int(finished.sum())  # the one host sync per step
        if t + 1 == config.max_new_tokens or n_done == len(active):
            return
        if n_done >= max(1, len(active) // 4):  # drop finished rows from the cache and the batch
            keep = (~finished).nonzero().squeeze(1)
            run.reorder(keep)
            seq, active, finished, tokens = seq[keep], active[keep], finished[keep], tokens[keep]
            if generators is not None and len(generators) > 1:  # per-row streams leave with their rows
                generators = [generators[i] for i in keep.tolist()]
        logits = run.step(tokens)


def _generators(seed: int | list[int] | None, batch: int, device) -> list[torch.Generator]:
    """The random streams of a sampled generation: ``[one]`` shared by the batch (seed an int, or None: a random
    seed), or one per row (seed a list of ``batch`` seeds), so that a row's draws never depend on its neighbours."""
    if isinstance(seed, list):
        if len(seed) != batch:
            raise ConfigError(f"seed has {len(seed)} per-row seeds but the batch has {batch} rows; give one per row")
        seeds = seed
    else:
        seeds = [seed if seed is not None else int(torch.randint(2**62, ()).item())]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from probs (A, V) -> (A,); with per-row generators each row draws from its own."""
    if len(generators) == 1:  # also a single row with its own seed: the same draw either way
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(1)
    return torch.cat([torch.multinomial(row[None], 1, generator=g) for row, g in zip(probs, generators)]).squeeze(1)


@torch.inference_mode()
def generate_tokens(model, input_ids, attention_mask=None, config: GenerationConfig | None = None,
                    tokenizer=None, num_return_sequences: int = 1, **overrides: Any) -> list[list[int]]:
    """Generate new tokens for each row of `input_ids` -> their ids (new tokens only, unpadded).

    `num_return_sequences` n > 1 (sampling): n continuations of each prompt, prompt-major (B * n lists), which
    share the prompt's prefill; a list ``config.seed`` then gives one seed per continuation.

    `input_ids` is a (B, T) tensor (left-padded, with `attention_mask`) or a list of token lists (padded
    here). A row that stopped on an eos id ends with that id; one stopped by a stop string ends with the
    token that completed it (pass `tokenizer` to use stop strings). Fields of `config` can be overridden
    by keyword (``max_new_tokens=20``).
    """
    config = resolve_config(model, config, tokenizer, **overrides)
    input_ids, attention_mask = prepare_inputs(model, input_ids, attention_mask, config)
    was_training = model.training
    model.eval()
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ConfigError(f"num_return_sequences={num_return_sequences!r} must be an integer >= 1")
    if num_return_sequences > 1 and (config.num_beams > 1 or not config.sampling):
        raise ConfigError(f"num_return_sequences={num_return_sequences} needs sampling without beams: greedy "
                          "continuations of one prompt are one text")
    rows = input_ids.shape[0] * config.num_beams * num_return_sequences  # rows of each step (fewer once rows finish)
    try:
        # batched CPU fp32 steps: weights pre-packed for `rows` where that measured faster (lmlab.nn.packed)
        with maybe_packed_linears(model, rows):
            if config.num_beams > 1:
                return beam_search(model, input_ids, attention_mask, config, tokenizer)
            steps, lengths = [], None
            for tokens, done in sample_steps(model, input_ids, attention_mask, config, tokenizer,
                                             expand=num_return_sequences):
                steps.append(tokens)
                if lengths is None:
                    lengths = torch.full_like(tokens, config.max_new_tokens)
                newly = done & (lengths == config.max_new_tokens)
                lengths = torch.where(newly, len(steps), lengths)
        out = torch.stack(steps, 1).tolist()  # (B, n)
        return [row[:n] for row, n in zip(out, lengths.tolist())]
    finally:
        model.train(was_training)


# --- text-level generation ---------------------------------------------------------------------
def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> (ids (B, T), attention_mask (B, T) or None for one prompt), as the model expects them.

    Special tokens follow the tokenizer's own configuration (``add_special_tokens=True``): BOS for a
    LLaMA/Mistral tokenizer with ``add_bos_token``, the trailing ``</s>`` of T5's encoder input, nothing
    for SmolLM2's GGUF (its metadata says ``add_bos_token = false``). A chat template that already wrote
    BOS does not get a second one (see ``Tokenizer.encode``). Several prompts are left-padded.
    """
    prompts = list(prompts)
    if len(prompts) == 1:
        ids = torch.tensor([tokenizer.encode(prompts[0], add_special_tokens=True)], dtype=torch.long)  # (1, T)
        return ids, None
    ids, mask = tokenizer.encode_batch(prompts, padding_side="left", add_special_tokens=True)
    return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)


def generate(model, tokenizer, prompts: str | list[str], config: GenerationConfig | None = None,
             **overrides: Any) -> str | list[str]:
    """Generate a continuation for each prompt -> the new text (special tokens and stop strings removed).

    A single string gives a string; a list gives a list, generated as one left-padded batch.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        return []
    config = resolve_config(model, config, tokenizer, **overrides)
    ids, mask = encode_prompts(tokenizer, texts)
    new = generate_tokens(model, ids, mask, config, tokenizer=tokenizer)
    outs = [trim_stop_strings(tokenizer.decode(row, skip_special_tokens=True), config.stop_strings) for row in new]
    return outs[0] if single else outs
