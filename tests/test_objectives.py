"""Objectives: statistics of the corruption over many samples, exact reconstruction, loss wiring."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.model import Transformer
from lmlab.objectives import (CausalLM, MaskedLM, SpanCorruption, build_objective, random_spans_noise_mask,
                              token_cross_entropy)
from lmlab.objectives.base import IGNORE_INDEX

VOCAB = 256
SPECIAL = [0, 1, 2, 3, 4]  # pad, bos, eos, unk, mask
MASK = 4


def _blocks(B, L, seed=0, low=5, high=VOCAB):
    return torch.randint(low, high, (B, L), generator=torch.Generator().manual_seed(seed))


# --- causal LM --------------------------------------------------------------------------------
def test_clm_shifts_and_ignores_padding():
    obj = CausalLM(pad_token_id=0)
    blocks = torch.tensor([[5, 6, 7, 8, 0, 0]])
    batch = obj.prepare(blocks)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0]]
    assert obj.block_length(8) == 9


def test_clm_loss_matches_manual_shifted_cross_entropy():
    cfg = ModelConfig.from_name("tiny-decoder")
    model = Transformer(cfg)
    blocks = _blocks(2, 17)
    loss, n = CausalLM().loss(model, CausalLM().prepare(blocks))
    logits = model(blocks)[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), blocks[:, 1:].reshape(-1))
    assert n == 2 * 16
    torch.testing.assert_close(loss, expected)


def test_cross_entropy_with_no_counted_token_is_zero_and_differentiable():
    logits = torch.randn(1, 3, 7, requires_grad=True)
    loss, n = token_cross_entropy(logits, torch.full((1, 3), IGNORE_INDEX))
    loss.backward()
    assert int(n) == 0 and loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# --- masked LM --------------------------------------------------------------------------------
def test_mlm_statistics_over_many_samples():
    obj = MaskedLM(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, pad_token_id=0)
    blocks = _blocks(256, 128, low=0)  # includes special ids, which must never be selected
    batch = obj.prepare(blocks, torch.Generator().manual_seed(1))
    selected = batch["labels"] != IGNORE_INDEX
    special = torch.isin(blocks, torch.tensor(SPECIAL))
    assert not (selected & special).any()
    frac = selected.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.01, frac
    inp, n_sel = batch["input_ids"][selected], selected.sum().item()
    orig = blocks[selected]
    masked = (inp == MASK).sum().item() / n_sel
    kept = (inp == orig).sum().item() / n_sel
    randomised = ((inp != MASK) & (inp != orig)).sum().item() / n_sel
    assert abs(masked - 0.8) < 0.02, masked
    assert abs(kept - 0.1) < 0.02, kept  # (a random draw equal to the original counts as kept: ~0.04%)
    assert abs(randomised - 0.1) < 0.02, randomised
    assert not torch.isin(inp[(inp != MASK) & (inp != orig)], torch.tensor(SPECIAL)).any()
    assert torch.equal(batch["input_ids"][~selected], blocks[~selected])  # unselected positions untouched


def test_mlm_reconstructs_the_original():
    obj = MaskedLM(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    blocks = _blocks(8, 64, low=0)
    batch = obj.prepare(blocks, torch.Generator().manual_seed(3))
    labels = batch["labels"]
    rebuilt = torch.where(labels != IGNORE_INDEX, labels, batch["input_ids"])
    assert torch.equal(rebuilt, blocks)


def test_mlm_is_seeded():
    obj = MaskedLM(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    blocks = _blocks(4, 32)
    a = obj.prepare(blocks, torch.Generator().manual_seed(7))
    b = obj.prepare(blocks, torch.Generator().manual_seed(7))
    c = obj.prepare(blocks, torch.Generator().manual_seed(8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


def test_mlm_rejects_bad_mask_id():
    with pytest.raises(ConfigError, match="mask_token_id=999"):
        MaskedLM(mask_token_id=999, vocab_size=VOCAB)


def test_mlm_loss_counts_selected_positions_only():
    model = Transformer(ModelConfig.from_name("tiny-encoder"))
    obj = MaskedLM(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    batch = obj.prepare(_blocks(2, 32), torch.Generator().manual_seed(0))
    loss, n = obj.loss(model, batch)
    assert n == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    assert torch.isfinite(loss)


# --- span corruption --------------------------------------------------------------------------
SENTINELS = list(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> = 255, <extra_id_1> = 254, ...


def test_noise_mask_statistics():
    g = torch.Generator().manual_seed(0)
    lengths, densities = [], []
    for _ in range(500):
        mask = random_spans_noise_mask(128, 0.15, 3.0, g)
        assert not mask[0] and mask[-1]  # T5: starts with a kept span, ends with a noise span
        densities.append(mask.float().mean().item())
        edges = torch.diff(torch.cat([torch.tensor([0]), mask.long(), torch.tensor([0])]))
        starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
        lengths.extend((ends - starts).tolist())
    mean_span = sum(lengths) / len(lengths)
    assert abs(sum(densities) / len(densities) - 0.15) < 0.02
    assert abs(mean_span - 3.0) < 0.3, mean_span
    assert min(lengths) >= 1 and max(lengths) > 3  # random segmentation, not fixed-length spans


def test_span_corruption_reconstructs_and_uses_descending_sentinels():
    obj = SpanCorruption(SENTINELS, eos_token_id=2, decoder_start_token_id=0)
    blocks = _blocks(64, 100, low=2, high=VOCAB - 100, seed=5)  # eos (2) occurs inside spans too: it is data there
    batch = obj.prepare(blocks, torch.Generator().manual_seed(0))
    T_enc, T_dec = obj.lengths(100)
    assert batch["input_ids"].shape == (64, T_enc) and batch["labels"].shape == (64, T_dec)
    for i in range(64):
        inp, lab = batch["input_ids"][i], batch["labels"][i]
        assert obj.reconstruct(inp, lab) == blocks[i].tolist()
        sent_in = [t for t in inp.tolist() if t in SENTINELS]
        assert sent_in == SENTINELS[: len(sent_in)]  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in lab.tolist() if t in SENTINELS] == sent_in
        assert inp[-1] == 2 and lab[-1] == 2 and lab[0] == SENTINELS[0]
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    assert (batch["decoder_input_ids"][:, 0] == 0).all()


def test_span_block_length_fits_the_encoder():
    obj = SpanCorruption(SENTINELS, eos_token_id=2)
    L = obj.block_length(128)
    assert obj.lengths(L)[0] <= 128 < obj.lengths(L + 1)[0]
    assert L > 128  # corruption shortens the input, so more raw tokens fit


def test_span_loss_runs_on_encoder_decoder():
    model = Transformer(ModelConfig.from_name("tiny-encoder-decoder"))
    obj = SpanCorruption(SENTINELS, eos_token_id=2)
    batch = obj.prepare(_blocks(2, 40), torch.Generator().manual_seed(0))
    loss, n = obj.loss(model, batch)
    assert n == batch["labels"].numel() and torch.isfinite(loss)


def test_registry():
    assert isinstance(build_objective("clm"), CausalLM)
    with pytest.raises(ConfigError, match="objective='gan'"):
        build_objective("gan")
