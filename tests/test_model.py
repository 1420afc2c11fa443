"""The Transformer itself: shapes, parameter counts, cache equivalence, config validation."""

import pytest
import torch

from lmlab.config import PRESETS, ModelConfig
from lmlab.errors import ConfigError
from lmlab.model import Transformer
from parity import fp32_bound

TINY = ["tiny-decoder", "tiny-encoder", "tiny-encoder-decoder"]


@pytest.mark.parametrize("name", [n for n in PRESETS if ModelConfig.from_name(n).num_parameters() < 2e8])
def test_parameter_count_matches_config(name):
    cfg = ModelConfig.from_name(name)
    assert Transformer(cfg).num_parameters() == cfg.num_parameters()


def test_known_parameter_counts():
    # the reference implementations' counts for these shapes
    assert ModelConfig.from_name("gpt2-124m").num_parameters() == 124_439_808
    assert ModelConfig.from_name("smollm2-135m").num_parameters() == 134_515_008
    assert ModelConfig.from_name("t5-small").num_parameters() == 60_506_624


@pytest.mark.parametrize("name", TINY)
def test_output_shapes(name):
    cfg = ModelConfig.from_name(name)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    out = model(ids, decoder_input_ids=ids[:, :3]) if cfg.arch == "encoder_decoder" else model(ids)
    T = 3 if cfg.arch == "encoder_decoder" else 7
    assert out.shape == (2, T, cfg.vocab_size)


def test_encoder_without_head_returns_hidden_states():
    cfg = ModelConfig.from_name("tiny-encoder", head="none")
    out = Transformer(cfg)(torch.randint(0, 256, (2, 5)))
    assert out.shape == (2, 5, cfg.d_model)


@pytest.mark.parametrize("name", ["tiny-decoder", "gpt2-124m"])
def test_cached_decoding_equals_full_recompute_decoder(name):
    overrides = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=300) if name == "gpt2-124m" else {}
    cfg = ModelConfig.from_name(name, **overrides)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, 12)]
    # cached and full decoding round their sums in another order: an fp32 error bound, not a fixed 1e-5
    assert (torch.cat(parts, 1) - full).abs().max() <= fp32_bound(full, cfg, seq_len=12)


def test_cached_decoding_equals_full_recompute_encoder_decoder():
    cfg = ModelConfig.from_name("tiny-encoder-decoder")
    model = Transformer(cfg).eval()
    src, tgt = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(src, attention_mask=mask, decoder_input_ids=tgt)
        enc = model.encode(src, mask)
        cache = model.new_cache(2, 8)
        steps = [model.decode(tgt[:, i:i + 1], encoder_out=enc, encoder_mask=mask, cache=cache) for i in range(6)]
    assert (torch.cat(steps, 1) - full).abs().max() <= fp32_bound(full, cfg, seq_len=9)


def test_padding_does_not_change_unpadded_rows():
    cfg = ModelConfig.from_name("tiny-decoder")
    model = Transformer(cfg).eval()
    ids = torch.randint(1, 256, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask, position_ids=pos)[:, 3:]
    assert (a - b).abs().max() <= fp32_bound(a, cfg, seq_len=9)


@pytest.mark.parametrize("bad,match", [
    (dict(arch="rnn"), "arch='rnn'"),
    (dict(activation="swish2"), "activation='swish2'"),
    (dict(d_model=100, n_heads=3), "d_model=100 is not divisible by n_heads=3"),
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads=3"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
])
def test_bad_config_names_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**bad)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="n_layer_typo"):
        ModelConfig.from_dict({"n_layer_typo": 3})


def test_config_json_round_trip(tmp_path):
    cfg = ModelConfig.from_name("t5-small")
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg


def test_vaswani_preset_trains_one_step():
    cfg = ModelConfig.from_name("transformer-base", vocab_size=128, d_model=32, n_heads=4, d_ff=64, n_layers=1)
    model = Transformer(cfg)
    src, tgt = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 6))
    logits = model(src, decoder_input_ids=tgt[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), tgt[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_out_of_vocabulary_id_is_a_clear_error():
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    with pytest.raises(ValueError, match="token id 256 is outside the vocabulary"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_model_level_bad_input_raises_lmlab_errors_naming_the_value():
    """Errors from the model and its cache are lmlab's types (one line from the CLI), not bare ValueErrors."""
    from lmlab.errors import ConfigError, DataError
    from lmlab.nn.kv_cache import KVCache

    decoder = Transformer(ModelConfig.from_name("tiny-decoder"))
    with pytest.raises(DataError, match="token id 256 is outside the vocabulary"):
        decoder(torch.tensor([[1, 256]]))
    with pytest.raises(DataError, match=r"input_ids must be \(batch, seq_len\); got shape \(3,\)"):
        decoder(torch.tensor([1, 2, 3]))
    with pytest.raises(DataError, match="attention_mask covers 2 positions; expected 3"):
        decoder(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ConfigError, match="encode\\(\\) needs an encoder; this model has arch='decoder'"):
        decoder.encode(torch.tensor([[1, 2]]))
    with pytest.raises(DataError, match="KV cache overflow: need 5 positions, capacity is 4"):
        KVCache(1, 1, 4, 2, torch.float32).update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    encoder = Transformer(ModelConfig.from_name("tiny-encoder"))
    with pytest.raises(ConfigError, match="a KV cache needs a decoder; this model has arch='encoder'"):
        encoder.new_cache(1, 4)
    t5 = Transformer(ModelConfig.from_name("tiny-encoder-decoder"))
    with pytest.raises(DataError, match="needs decoder_input_ids"):
        t5(torch.tensor([[1, 2]]))


def test_model_level_error_reaches_the_cli_as_one_line_and_exit_2(tmp_path, capsys):
    """A tokenizer whose ids exceed the model's vocabulary: the model's DataError, printed as one line."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lmlab.checkpoints import save_model
    from lmlab.cli import main
    from lmlab.tokenizer import Tokenizer

    backend = Backend(models.WordLevel(vocab={f"w{i}": i for i in range(32)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, {"eos": "w1"})
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=16))
    save_model(model, tmp_path / "m", tokenizer)
    assert main(["generate", str(tmp_path / "m"), "w3 w20", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: token id 20 is outside the vocabulary [0, 16)"  # after the "precision: ..." line
    assert not any("Traceback" in line for line in err)
