"""Minimum Bayes risk (MBR) selection: of n sampled summaries, keep the one the others agree with most.

Best-of-n needs a judge. A reward model is one; the samples themselves are another. MBR decoding
(Kumar & Byrne 2004; for neural text, Eikema & Aziz 2020, Freitag et al. 2022) treats the n samples as
draws from the model's distribution over outputs and picks the candidate with the highest *expected
utility* against them:

    pick  argmax_i  1/(n-1) * sum_{j != i} u(c_i, c_j)

With ROUGE as the utility u, that is the candidate closest on average to what the model might have
written: the consensus summary. Odd samples (a loop, a wrong name, a runaway sentence) agree with few
others and lose; greedy decoding's single mode is not always the consensus either. It costs n samples
and n(n-1)/2 ROUGE comparisons per input, and needs no reward model and no reference.

``MBRScorer`` plugs into ``lmlab.align.best_of_n.best_of_n`` as its scorer: it scores a prompt's whole
group of candidates at once (``score_candidates``), where a reward model scores each alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmlab.errors import choices_error

# The utilities MBR can use: a ROUGE F-measure, or the mean of ROUGE-1, -2 and -L ("rouge").
UTILITIES = ("rouge", "rouge1", "rouge2", "rougeL")


class MBRScorer:
    """Expected ROUGE of each candidate against the other candidates of the same input.

    `utility`: "rouge1", "rouge2", "rougeL" (F-measures, Porter-stemmed, as the lab scores) or "rouge"
    (their mean, the default). Empty candidates get utility 0 against everything, so they are never kept
    unless every candidate is empty.
    """

    def __init__(self, utility: str = "rouge"):
        if utility not in UTILITIES:
            raise choices_error("MBR utility", utility, UTILITIES)
        self.utility = utility

    def pair(self, a: str, b: str) -> float:
        """u(a, b): symmetric for F-measures, so each pair is scored once."""
        if not a.strip() or not b.strip():
            return 0.0
        from lmlab.tasks.summarize.rouge import _get_scorer

        scores = _get_scorer().score(b, a)
        if self.utility == "rouge":
            return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3
        return scores[self.utility].fmeasure

    def score_candidates(self, source: str, candidates: Sequence[str]) -> list[float]:
        """The expected utility of each candidate against the others (`source`, the input, is unused).

        A pair of identical texts is compared once and reused; a summary the model wrote k times still
        counts k times (sampling frequency is the evidence MBR weighs).
        """
        n = len(candidates)
        if n == 1:
            return [0.0]
        cache: dict[tuple[str, str], float] = {}
        totals = [0.0] * n
        for i in range(n):
            for j in range(i + 1, n):
                key = (candidates[i], candidates[j]) if candidates[i] <= candidates[j] else (candidates[j], candidates[i])
                if key not in cache:
                    cache[key] = self.pair(*key)
                totals[i] += cache[key]
                totals[j] += cache[key]
        return [t / (n - 1) for t in totals]
