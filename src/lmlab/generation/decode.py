"""Autoregressive decoding: greedy, sampling and beam search over a preallocated KV cache.

Three entry points, from tokens to text:

* ``generate_tokens(model, input_ids, attention_mask, config)`` -> new token ids per row
* ``generate(model, tokenizer, prompts, config, **overrides)``   -> text (str in, str out; list in, list out)
* ``stream(model, tokenizer, prompt, config, **overrides)``       -> an iterator of text deltas

How one generation runs (decoder-only; an encoder-decoder runs its encoder once and starts the
decoder from ``decoder_start_token_id``):

1. *prefill*: the whole prompt goes through the model once, filling the cache; only the last
   position's logits are computed (``logits_to_keep=1``).
2. *steps*: each new token goes through the model alone, reading the cached keys/values.
   Unpadded batches pass no attention mask at all (the model then builds none); left-padded
   batches pass a preallocated mask slice and explicit positions, as Hugging Face does, so a
   padded row gives the same tokens as the same prompt alone.
3. *stopping*: a row finishes on any eos id or stop string and is padded from then on; once a
   quarter of the rows still running have finished, finished rows leave the batch (``cache.reorder``)
   so they stop costing compute. The loop ends when every row has finished (checked with the one
   host sync per step) or after ``max_new_tokens``.

On the CPU in fp32, batched generation (B * beams >= 4 rows) multiplies through weights pre-packed for
that many rows where a one-off, cached calibration measured that faster on this machine
(``lmlab.nn.packed.maybe_packed_linears``; the packed copies stay on the model for the next call; rows
that leave the batch are zero-padded back, not re-packed): MKL's sgemm otherwise re-packs each weight
on every skinny decode-step call. Tokens can differ from the unpacked path only by float rounding;
``LMLAB_PACKED_GEMM=0`` switches it off, ``=1`` forces it on even for one row.

Beam search follows Hugging Face's vectorised algorithm step for step (same candidate count,
same length normalisation, same early-stopping heuristic), so it returns the same tokens.

Shapes: B batch (prompts), N beams, T prompt length, V vocabulary, L tokens so far.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lmlab.errors import ConfigError, DataError
from lmlab.generation.config import GenerationConfig
from lmlab.generation.processors import build_processors
from lmlab.nn.packed import maybe_packed_linears

PAD_MARK = -1  # marks left padding in the token history the processors see


# --- the model side: prefill once, then one token per step ----------------------------------
class _DecoderOnlyRun:
    """Drives a decoder-only model over one generation's cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int):
        self.model, self.input_ids = model, input_ids
        B, T = input_ids.shape
        # decided once per generation: the steps then never read the mask back to the host
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self.cache = model.new_cache(B, T + max_new_tokens)
        if self.padded:
            # one mask for prompt + every future token, sliced per step instead of concatenated
            self.mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
            self.mask[:, :T] = attention_mask
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) pads get 0

    def prefill(self) -> torch.Tensor:
        T = self.input_ids.shape[1]
        if self.padded:
            logits = self.model(self.input_ids, attention_mask=self.mask[:, :T], position_ids=self.positions,
                                cache=self.cache, logits_to_keep=1, mask_has_padding=True)
            self.positions = self.positions[:, -1:] + 1  # (B, 1) position of the next token
        else:
            logits = self.model(self.input_ids, cache=self.cache, logits_to_keep=1)
        return logits[:, -1]  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> next-token logits (B, V)."""
        if self.padded:
            S = self.cache.length + 1
            logits = self.model(tokens[:, None], attention_mask=self.mask[:, :S], position_ids=self.positions,
                                cache=self.cache, mask_has_padding=True)
            self.positions = self.positions + 1
        else:
            logits = self.model(tokens[:, None], cache=self.cache)
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        if self.padded:
            self.mask, self.positions = self.mask.index_select(0, index), self.positions.index_select(0, index)


class _EncoderDecoderRun:
    """Drives an encoder-decoder: the encoder runs once; cross-attention K/V are cached on the first step."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 start_token_id: int, expand: int = 1):
        self.model, self.start_token_id = model, start_token_id
        # decided once per generation: the steps then never read the mask back to the host
        self.padded = padded = attention_mask is not None and not bool(attention_mask.all())
        self.encoder_out = model.encode(input_ids, attention_mask if padded else None)  # (B, T, C)
        self.encoder_mask = attention_mask if padded else None
        if expand > 1:  # beams share their prompt's encoding
            self.encoder_out = self.encoder_out.repeat_interleave(expand, 0)  # (B*N, T, C)
            if self.encoder_mask is not None:
                self.encoder_mask = self.encoder_mask.repeat_interleave(expand, 0)
        self.batch = self.encoder_out.shape[0]
        self.cache = model.new_cache(self.batch, 1 + max_new_tokens)

    def prefill(self) -> torch.Tensor:
        start = torch.full((self.batch, 1), self.start_token_id, dtype=torch.long, device=self.encoder_out.device)
        logits = self.model.decode(start, encoder_out=self.encoder_out, encoder_mask=self.encoder_mask,
                                   cache=self.cache, logits_to_keep=1, mask_has_padding=self.padded)
        self.encoder_out = None  # from now on the cache holds the cross-attention keys/values
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens[:, None], encoder_mask=self.encoder_mask, cache=self.cache,
                                 mask_has_padding=self.padded)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, index)


# --- resolving defaults ------------------------------------------------------------------------
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


def _stop_checker(tokenizer, stop_strings: Sequence[str]):
    """-> fn(new_tokens (B, n), active (B,) bool) -> (B,) bool: rows whose recent text contains a stop string.

    Leading whitespace of the output does not count (see ``trim_stop_strings``). Past the first few
    tokens only a window is decoded: a stop string of c characters spans at most c tokens, plus a margin
    for tokens that decode to partial characters."""
    if not stop_strings:
        return None
    if tokenizer is None:
        raise DataError(f"stop_strings={list(stop_strings)!r} need a tokenizer to decode the text")
    window = max(len(s) for s in stop_strings) + 4

    def check(new_tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros(new_tokens.shape[0], dtype=torch.bool)
        recent = new_tokens[:, -window:].tolist()
        from_start = new_tokens.shape[1] <= window  # the window still holds the whole output
        for row, on in enumerate(active.tolist()):
            if on:
                text = tokenizer.decode(recent[row], skip_special_tokens=True)
                hit[row] = any(s in (text.lstrip() if from_start else text) for s in stop_strings)
        return hit.to(new_tokens.device)

    return check


def trim_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any stop string (the stop string is removed too).

    Occurrences inside the leading whitespace do not count: a model that starts its answer with a
    blank line should not be stopped by a "\\n\\n" stop string before it says anything.
    """
    start = len(text) - len(text.lstrip())
    cut = min((i for i in (text.find(s, start) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


# --- token-level generation --------------------------------------------------------------------
def _prepare(model, input_ids, attention_mask, config: GenerationConfig):
    if not isinstance(input_ids, torch.Tensor):  # a list of token lists: left-pad them
        rows = [list(r) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise DataError("input_ids must hold at least one non-empty sequence of token ids")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        input_ids, attention_mask = ids, (mask if attention_mask is None else attention_mask)
    input_ids = input_ids.to(model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise DataError("input_ids is empty: a prompt needs at least one token")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=model.device).long()
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise DataError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()) and model.config.arch == "decoder":
            raise DataError("decoder-only batches must be left-padded: attention_mask[:, -1] has a 0")
    cfg = model.config
    absolute = cfg.positional in ("learned", "sinusoidal")
    need = (1 if cfg.arch == "encoder_decoder" else input_ids.shape[1]) + config.max_new_tokens
    if absolute and need > cfg.max_seq_len:
        raise DataError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={config.max_new_tokens} = {need} "
                        f"exceeds the model's max_seq_len={cfg.max_seq_len}")
    return input_ids, attention_mask


def _start_run(model, input_ids, attention_mask, config: GenerationConfig, expand: int = 1):
    """-> (run, history (B*expand, L0)): the model driver and the tokens the processors see."""
    cfg = model.config
    if cfg.arch == "encoder":
        raise DataError(f"generation needs a decoder; this model has arch={cfg.arch!r}")
    if cfg.arch == "encoder_decoder":
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        if start is None:
            raise DataError("an encoder-decoder model needs decoder_start_token_id (or pad_token_id) in its config")
        run = _EncoderDecoderRun(model, input_ids, attention_mask, config.max_new_tokens, start, expand)
        history = torch.full((run.batch, 1), start, dtype=torch.long, device=input_ids.device)
        return run, history
    if expand > 1:
        input_ids = input_ids.repeat_interleave(expand, 0)  # (B*N, T)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(expand, 0)
    history = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, PAD_MARK)
    return _DecoderOnlyRun(model, input_ids, attention_mask, config.max_new_tokens), history


def _sample_steps(model, input_ids, attention_mask, config: GenerationConfig, tokenizer=None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding, one step at a time: yields (tokens (B,), finished (B,)) per step.

    A row's token at the step it finishes is its eos (or the token completing a stop string);
    after that it gets pad_token_id. Finished rows leave the batch (``cache.reorder``) once at least a
    quarter of the rows still decoded have finished, so they stop costing compute; the yielded
    tensors keep the full batch.
    """
    run, history = _start_run(model, input_ids, attention_mask, config)
    B, L0 = history.shape
    device = history.device
    # token history preallocated for prompt + new tokens (the processors read a prefix of it)
    seq = torch.empty(B, L0 + config.max_new_tokens, dtype=torch.long, device=device)
    seq[:, :L0] = history
    chain = build_processors(config, prompt_len=L0, eos_token_ids=config.eos_token_ids)
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device) if config.eos_token_ids else None
    stop_check = _stop_checker(tokenizer, config.stop_strings)
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


def _beam_search(model, input_ids, attention_mask, config: GenerationConfig, tokenizer=None) -> list[list[int]]:
    """Beam search as Hugging Face's ``generate(num_beams=N)`` does it -> best hypothesis per prompt.

    Each step keeps K = max(2, 1 + n_eos) * N candidates over all beams of a prompt. Candidates ending
    in eos among the top N become finished hypotheses scored sum(log p) / new_len ** length_penalty;
    the best N others continue. A prompt stops when its finished hypotheses cannot be beaten
    (``early_stopping``: True = N finished; False = HF's heuristic with the current length;
    "never" = with the longest possible length) and all stop at max_new_tokens.
    """
    N = config.num_beams
    B = input_ids.shape[0]
    run, history = _start_run(model, input_ids, attention_mask, config, expand=N)
    L0 = history.shape[1]
    device = history.device
    max_len = L0 + config.max_new_tokens
    eos_ids = config.eos_token_ids or []
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    K = max(2, 1 + len(eos_ids)) * N
    top_n = torch.arange(K, device=device) < N  # (K,) only these candidates may finish
    chain = build_processors(config, prompt_len=L0, eos_token_ids=eos_ids)
    stop_check = _stop_checker(tokenizer, config.stop_strings)
    lp, early = config.length_penalty, config.early_stopping

    running = torch.full((B, N, max_len), config.pad_token_id, dtype=torch.long, device=device)
    running[:, :, :L0] = history.view(B, N, L0)
    running_scores = torch.zeros(B, N, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    done_seqs = running.clone()
    done_scores = torch.full((B, N), -1e9, device=device)
    done_len = torch.zeros(B, N, dtype=torch.long, device=device)  # new tokens of each finished hypothesis
    is_done = torch.zeros(B, N, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)[:, None]  # (B, 1)

    logits = run.prefill()
    cur = L0
    while True:
        logp = torch.log_softmax(logits.float(), -1)  # (B*N, V)
        if len(chain):
            logp = chain(running.view(B * N, max_len)[:, :cur], logp)
        V = logp.shape[-1]
        logp = (logp.view(B, N, V) + running_scores[:, :, None]).view(B, N * V)
        top_scores, top_idx = torch.topk(logp, K)  # (B, K)
        src = top_idx // V  # (B, K) beam each candidate extends
        cand = running[rows, src]  # (B, K, max_len)
        cand[:, :, cur] = top_idx % V
        if cur + 1 >= max_len:
            hits = torch.ones(B, K, dtype=torch.bool, device=device)
        else:
            hits = torch.isin(cand[:, :, cur], eos) if eos_ids else torch.zeros(B, K, dtype=torch.bool, device=device)
            if stop_check is not None:
                hits |= stop_check(cand[:, :, L0:cur + 1].reshape(B * K, -1), ~hits.view(-1)).view(B, K)

        # the best N unfinished candidates continue
        cont_scores = top_scores + hits.float() * -1e9
        keep = torch.topk(cont_scores, N).indices  # (B, N)
        running, running_scores, parent = cand[rows, keep], cont_scores.gather(1, keep), src.gather(1, keep)

        # finished candidates among the top N join the finished hypotheses if they beat them
        just = hits & top_n
        scores = top_scores / ((cur + 1 - L0) ** lp)
        scores = scores + (is_done.all(-1, keepdim=True) & (early is True)).float() * -1e9
        scores = scores + (~improvable).float() * -1e9
        scores = scores + (~just).float() * -1e9
        merged = torch.cat((done_scores, scores), 1)  # (B, N + K)
        best = torch.topk(merged, N).indices
        done_seqs = torch.cat((done_seqs, cand), 1)[rows, best]
        done_scores = merged.gather(1, best)
        is_done = torch.cat((is_done, just), 1).gather(1, best)
        new_len = torch.full((B, K), cur + 1 - L0, dtype=torch.long, device=device)
        done_len = torch.cat((done_len, new_len), 1).gather(1, best)

        cur += 1
        best_len = (max_len - L0) if (early == "never" and lp > 0) else (cur - L0)
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_done = torch.where(is_done, done_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        if (not bool(improvable.any()) or (early is True and bool(is_done.all()))
                or bool(hits.all())):
            break
        run.reorder((parent + rows * N).view(-1))
        logits = run.step(running[:, :, cur - 1].reshape(-1))

    return [done_seqs[b, 0, L0:L0 + int(done_len[b, 0])].tolist() for b in range(B)]


@torch.inference_mode()
def generate_tokens(model, input_ids, attention_mask=None, config: GenerationConfig | None = None,
                    tokenizer=None, **overrides: Any) -> list[list[int]]:
    """Generate new tokens for each row of `input_ids` -> their ids (new tokens only, unpadded).

    `input_ids` is a (B, T) tensor (left-padded, with `attention_mask`) or a list of token lists (padded
    here). A row that stopped on an eos id ends with that id; one stopped by a stop string ends with the
    token that completed it (pass `tokenizer` to use stop strings). Fields of `config` can be overridden
    by keyword (``max_new_tokens=20``).
    """
    config = resolve_config(model, config, tokenizer, **overrides)
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask, config)
    was_training = model.training
    model.eval()
    rows = input_ids.shape[0] * config.num_beams  # rows of each decode step (fewer once rows finish)
    try:
        # batched CPU fp32 steps: weights pre-packed for `rows` where that measured faster (lmlab.nn.packed)
        with maybe_packed_linears(model, rows):
            if config.num_beams > 1:
                return _beam_search(model, input_ids, attention_mask, config, tokenizer)
            steps, lengths = [], None
            for tokens, done in _sample_steps(model, input_ids, attention_mask, config, tokenizer):
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


def _incremental_decoder(tokenizer):
    from lmlab.tokenizer import IncrementalDecoder

    return IncrementalDecoder(tokenizer)


def stream(model, tokenizer, prompt: str, config: GenerationConfig | None = None, **overrides: Any) -> Iterator[str]:
    """Yield the text of one generation as it is produced, in deltas whose concatenation equals
    ``generate(model, tokenizer, prompt, config)``.

    Text that might be the start of a stop string is held back until it is known not to be one.
    Beam search cannot know its result before the end, so it yields the whole text at once.
    """
    config = resolve_config(model, config, tokenizer, **overrides)
    if config.num_beams > 1:
        yield generate(model, tokenizer, prompt, config)
        return
    ids, _ = encode_prompts(tokenizer, [prompt])
    decoder = _incremental_decoder(tokenizer)
    stops = config.stop_strings
    text, sent = "", 0  # all text so far, and how much of it was yielded
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, _ = _prepare(model, ids, None, config)
        eos = set(config.eos_token_ids or [])
        for tokens, done in _in_inference_mode(_sample_steps(model, ids, None, config, tokenizer)):
            token = int(tokens[0])
            if token not in eos:  # eos ends the text; it is never shown
                text += decoder.push(token)
            if stops:
                cut = trim_stop_strings(text, stops)
                if len(cut) < len(text):  # a stop string appeared: yield up to it and end
                    if len(cut) > sent:
                        yield cut[sent:]
                    return
                safe = len(text) - _held_back(text, stops)
            else:
                safe = len(text)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if bool(done[0]):
                break
        text += decoder.flush()
        text = trim_stop_strings(text, stops)
        if len(text) > sent:
            yield text[sent:]
    finally:
        model.train(was_training)


def _in_inference_mode(steps: Iterator) -> Iterator:
    """Run each step of a generator under ``torch.inference_mode()``, but not the caller's code between steps."""
    while True:
        with torch.inference_mode():
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
