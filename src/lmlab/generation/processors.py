"""Logits processors: pure steps of shape ``(input_ids, logits) -> logits``, chained in a fixed order.

``input_ids`` (B, L) is every token so far (prompt + generated; left padding marked with -1, which
no step treats as a token); ``logits`` (B, V) are the next-token scores. Each step returns new scores
and never modifies its input. ``build_processors(config, prompt_len)`` chains them in Hugging Face's
order, so the same settings give the same distribution as ``transformers``' ``generate``:

1. repetition_penalty   divide positive / multiply negative scores of tokens already in the sequence
2. no_repeat_ngram      forbid the token that would repeat an n-gram already in the sequence
3. min_new_tokens       forbid the end-of-sequence tokens until enough tokens were generated
   grammar              forbid tokens the row's grammar does not allow (``config.constraint``; structured output)
4. temperature          scores / T                                  (sampling only)
5. top_k                keep the k best tokens                      (sampling only)
6. top_p                keep the smallest set with probability >= p (sampling only)
7. min_p                keep tokens with p >= min_p * max p         (sampling only)

Steps 1-3 and the grammar change *which* tokens are allowed and also apply to greedy search; steps 4-7
shape the distribution a token is drawn from, so they only run when sampling. Greedy decoding is
the argmax of the chain's output. Forbidden tokens get -inf. The grammar comes after steps 1-3 and
before the sampling filters, so the filters only ever choose among tokens the grammar allows; where
steps 1-3 forbade every allowed token, the grammar wins (those rows keep its allowed tokens, at score 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmlab.generation.config import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


class RepetitionPenalty:
    """CTRL (Keskar et al. 2019): a token already present has its score divided by `penalty` if positive,
    multiplied by it if negative, so penalty > 1 makes repeats less likely. Prompt tokens count too."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        B, V = logits.shape
        # mark the tokens present in each row; padding (-1) goes to a spare column V
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, input_ids.masked_fill(input_ids < 0, V), True)
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen[:, :V], penalised, logits)


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the row (Paulus et al. 2017)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        n, V = self.n, logits.shape[-1]
        if L < n:
            return logits
        prefix = input_ids[:, L - n + 1:]  # (B, n-1) the last n-1 tokens
        windows = input_ids.unfold(1, n, 1)  # (B, L-n+1, n) every n-gram so far
        match = (windows[..., :-1] == prefix[:, None]).all(-1)  # (B, L-n+1) n-grams starting like the suffix
        banned_tok = windows[..., -1].masked_fill(~match | (windows[..., -1] < 0), V)  # their last token, else spare column
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        banned.scatter_(1, banned_tok, True)
        return logits.masked_fill(banned[:, :V], NEG_INF)


class MinNewTokens:
    """Suppress every end-of-sequence id while fewer than `min_new_tokens` tokens were generated."""

    def __init__(self, min_new_tokens: int, eos_token_ids: Sequence[int], prompt_len: int):
        self.min_new_tokens, self.prompt_len = min_new_tokens, prompt_len
        self.eos = list(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_len >= self.min_new_tokens:
            return logits
        out = logits.clone()
        out[:, self.eos] = NEG_INF
        return out


class Temperature:
    """Scale scores by 1/T: T < 1 sharpens the distribution, T > 1 flattens it."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    """Keep the k highest scores (ties with the k-th score are kept, as in HF)."""

    def __init__(self, k: int, min_tokens_to_keep: int = 1):
        self.k = max(k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1) the k-th best score
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens whose total probability
    first reaches p. Tokens are removed from the unlikely end while the mass removed stays <= 1 - p."""

    def __init__(self, p: float, min_tokens_to_keep: int = 1):
        self.p, self.min_tokens_to_keep = p, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V) mass of this token and all less likely ones
        remove = cum <= 1 - self.p
        remove[:, -self.min_tokens_to_keep:] = False
        return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


class MinP:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below min_p times the top one's."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        self.min_p, self.min_tokens_to_keep = min_p, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(-1)
        remove = probs < self.min_p * probs.amax(-1, keepdim=True)
        if self.min_tokens_to_keep > 1:
            top = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
            remove.scatter_(1, top, False)
        return logits.masked_fill(remove, NEG_INF)


class GrammarConstraint:
    """Structured output: each row keeps to its own grammar (``lmlab.generation.constrain``).

    `constraints` holds one ``Constraint`` per row (None: that row is free). Each call first advances every
    row's matcher by the token the row generated last, then masks the tokens its grammar forbids. Rows
    that leave the batch (finished rows are dropped by the decoding loop) are recognised by comparing the
    histories with the previous call's, so each surviving row keeps its own matcher.
    """

    def __init__(self, constraints: Sequence, prompt_len: int):
        self.constraints = list(constraints)
        self.prompt_len = prompt_len
        self.matchers = None  # one RowMatcher (or None) per row still in the batch
        self.previous: torch.Tensor | None = None  # (A, L-1) the history at the previous call

    def _follow_rows(self, input_ids: torch.Tensor) -> None:
        """Keep the matchers of the rows still present (the loop drops finished rows, keeping their order)."""
        prev = self.previous
        if prev is None or prev.shape[0] == input_ids.shape[0]:
            return
        now = input_ids[:, :prev.shape[1]]  # (A', L-1)
        keep, j = [], 0
        for row in now:
            while j < prev.shape[0] and not torch.equal(prev[j], row):
                j += 1
            if j == prev.shape[0]:
                raise RuntimeError("GrammarConstraint lost track of a batch row (rows must only leave, in order)")
            keep.append(j)
            j += 1
        self.matchers = [self.matchers[j] for j in keep]

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        if self.matchers is None:
            if len(self.constraints) == 1 and B > 1:
                self.constraints = self.constraints * B
            if len(self.constraints) != B:
                raise ValueError(f"{len(self.constraints)} constraints for a batch of {B} rows; give one per row")
            self.matchers = [c.new_matcher() if c is not None else None for c in self.constraints]
        else:
            self._follow_rows(input_ids)
            if L > self.prompt_len:
                last = input_ids[:, L - 1].tolist()
                for m, token in zip(self.matchers, last):
                    if m is not None:
                        m.advance(token)
        self.previous = input_ids
        masks = [m.allowed() if m is not None else None for m in self.matchers]
        if all(mask is None for mask in masks):
            return logits
        allowed = torch.ones(B, logits.shape[-1], dtype=torch.bool)
        for row, mask in enumerate(masks):
            if mask is not None:
                V = min(len(mask), logits.shape[-1])
                allowed[row, :V] = mask[:V]
                allowed[row, V:] = False
        allowed = allowed.to(logits.device)
        out = logits.masked_fill(~allowed, NEG_INF)
        stuck = torch.isneginf(out).all(-1)  # (B,) rows where steps 1-3 forbade everything the grammar allows
        if bool(stuck.any()):
            out[stuck] = torch.zeros_like(out[stuck]).masked_fill(~allowed[stuck], NEG_INF)
        return out


class Chain:
    """Apply processors in order; an empty chain returns the logits unchanged."""

    def __init__(self, steps: Sequence[Processor]):
        self.steps = list(steps)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            logits = step(input_ids, logits)
        return logits

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Chain({', '.join(type(s).__name__ for s in self.steps)})"


def build_processors(config: GenerationConfig, prompt_len: int = 0, eos_token_ids: Sequence[int] = ()) -> Chain:
    """The chain for `config`, in the order documented above. `prompt_len` is the length of the
    sequence before the first new token (for min_new_tokens); `eos_token_ids` the ids it suppresses."""
    steps: list[Processor] = []
    if config.repetition_penalty != 1.0:
        steps.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        steps.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.min_new_tokens > 0 and eos_token_ids:
        steps.append(MinNewTokens(config.min_new_tokens, eos_token_ids, prompt_len))
    if config.constraint is not None:
        constraints = config.constraint if isinstance(config.constraint, list) else [config.constraint]
        steps.append(GrammarConstraint(constraints, prompt_len))
    if config.sampling:
        if config.temperature != 1.0:
            steps.append(Temperature(config.temperature))
        if config.top_k > 0:
            steps.append(TopK(config.top_k))
        if config.top_p < 1.0:
            steps.append(TopP(config.top_p))
        if config.min_p > 0.0:
            steps.append(MinP(config.min_p))
    return Chain(steps)
