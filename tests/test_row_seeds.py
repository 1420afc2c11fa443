"""Per-row seeds (``GenerationConfig(seed=[...])``): each batch row samples from its own generator, so a row's
tokens are the same whatever else shares its batch, whichever place it holds there, and when rows around it
finish early and leave the batch."""

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.generation import GenerationConfig, generate_tokens
from lmlab.model import Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30, 31, 32]]  # different lengths: left padding
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def model():
    """A tiny random decoder with large weights, so sampled continuations vary from token to token."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=64)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    return model


def sample(model, prompts, seed, eos=()):
    return generate_tokens(model, prompts, do_sample=True, seed=seed, max_new_tokens=12, eos_token_ids=list(eos))


def test_each_row_samples_the_same_tokens_alone_or_in_any_batch(model):
    batched = sample(model, PROMPTS, SEEDS)
    alone = [sample(model, [p], [s])[0] for p, s in zip(PROMPTS, SEEDS)]
    assert batched == alone
    # a single row with its own seed is the same draw as that row seeded with the int
    assert alone == [sample(model, [p], s)[0] for p, s in zip(PROMPTS, SEEDS)]
    reordered = sample(model, PROMPTS[::-1], SEEDS[::-1])  # each row at another place in the batch
    assert reordered[::-1] == batched
    # not degenerate: the seeds matter, and a shared seed for the batch gives other rows than per-row seeds
    assert sample(model, [PROMPTS[0]], [99])[0] != alone[0]
    assert len({tuple(r) for r in batched}) == 4


def test_rows_that_finish_early_take_their_streams_with_them(model):
    # 8 of the 64 ids end a row: here rows 2, 0 and 1 finish after 1, 4 and 11 tokens and leave the batch
    # (cache.reorder) while the rows after them still sample
    eos = range(56, 64)
    batched = sample(model, PROMPTS, SEEDS, eos)
    alone = [sample(model, [p], [s], eos)[0] for p, s in zip(PROMPTS, SEEDS)]
    assert batched == alone
    lengths = [len(r) for r in batched]
    assert lengths[2] < lengths[3] and len(set(lengths)) >= 3  # rows really did finish at different steps


def test_per_row_seeds_are_validated(model):
    with pytest.raises(ConfigError, match="seed has 3 per-row seeds but the batch has 4 rows"):
        sample(model, PROMPTS, SEEDS[:3])
    for bad in ([], [1, -2], [1, 2.5], [True]):
        with pytest.raises(ConfigError, match=r"seed=\["):
            GenerationConfig(do_sample=True, seed=bad)
    assert GenerationConfig(seed=(3, 4)).seed == [3, 4]
