"""Best-of-n sampling: draw n summaries, score each with a reward model, keep the highest-scoring one.

The simplest use of a reward model, and the baseline preference training must beat: it changes no
weight, it only spends n times the decoding (plus n reward-model passes) per input. The n samples of a
prompt run as n rows of one batch that share the prompt's prefill (its KV cache is computed once and
copied); each row draws from its own generator seeded from the prompt's seed and the row's index, so a
prompt's candidates are the same whatever else shares its batch.

The reward model reads *text*: each candidate is decoded, cleaned and written into the reward model's
own input format (``lmlab.align.reward.encode_example``) with the task input (the dialogue), so the
reward model need not share the policy's tokenizer. Ties keep the earliest candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmlab.errors import ConfigError, DataError
from lmlab.generation import generate_tokens
from lmlab.generation.decode import encode_prompts, resolve_config
from lmlab.generation.stopping import trim_stop_strings


@dataclass
class BestOfN:
    text: str  # the chosen candidate (cleaned)
    index: int  # its position among the candidates
    candidates: list[str]  # every candidate, cleaned, in sampling order
    scores: list[float]  # the reward of each candidate
    tokens: list[int]  # generated tokens of each candidate

    @property
    def score(self) -> float:
        return self.scores[self.index]


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Seeds of a prompt's n rows: distinct, stable, and independent of the batch they run in."""
    return [(seed * 1_000_003 + k * 7_919 + 1) % (2**31) for k in range(n)]


def best_of_n(model, tokenizer, prompts: Sequence[str], inputs: Sequence[str], n: int, config, scorer,
              seeds: Sequence[int] | None = None, clean: Callable[[str], str] = str.strip) -> list[BestOfN]:
    """For each prompt: sample `n` continuations, score them with `scorer`, keep the best.

    `scorer` either scores each (input, candidate) alone, ``score(inputs, texts)`` (a reward model,
    ``lmlab.align.reward.RewardScorer``), or a prompt's candidates together,
    ``score_candidates(input, candidates)`` (minimum Bayes risk, ``lmlab.align.mbr.MBRScorer``).

    `prompts` are the rendered model prompts; `inputs` the task inputs the reward model reads with each
    candidate (for summarization, the dialogues). `config` must sample (n greedy runs are one text);
    `seeds` gives one seed per prompt (default: ``config.seed`` or 0 for all).
    """
    if n < 1:
        raise ConfigError(f"--best-of {n} must be >= 1")
    if n > 1 and not config.do_sample:
        raise ConfigError(f"--best-of {n} needs sampling (--do-sample): {n} greedy runs would write the same text")
    if len(prompts) != len(inputs):
        raise DataError(f"{len(prompts)} prompts but {len(inputs)} inputs for best-of-n")
    if not prompts:
        return []
    if seeds is None:
        base = config.seed if isinstance(config.seed, int) else 0
        seeds = [base] * len(prompts)
    row_seeds = [s for seed in seeds for s in candidate_seeds(seed, n)]  # (B * n): a prompt's n rows are adjacent
    config = resolve_config(model, config.replace(seed=row_seeds), tokenizer)
    ids, mask = encode_prompts(tokenizer, list(prompts))  # (B, T), left-padded: each prompt prefilled once
    new = generate_tokens(model, ids, mask, config, tokenizer=tokenizer, num_return_sequences=n)
    texts = [clean(trim_stop_strings(tokenizer.decode(row, skip_special_tokens=True), config.stop_strings))
             for row in new]
    if hasattr(scorer, "score_candidates"):  # a judge of the whole group (lmlab.align.mbr.MBRScorer)
        scores = [s for i, x in enumerate(inputs) for s in scorer.score_candidates(x, texts[i * n:(i + 1) * n])]
    else:  # a judge of each candidate alone (a reward model)
        scores = scorer.score([x for x in inputs for _ in range(n)], texts)
    results = []
    for i in range(len(prompts)):
        group = slice(i * n, (i + 1) * n)
        cand, cand_scores = texts[group], scores[group]
        best = max(range(n), key=lambda k: (cand_scores[k], -k))  # the highest score; ties: the earliest
        results.append(BestOfN(cand[best], best, cand, cand_scores, [len(r) for r in new[group]]))
    return results
