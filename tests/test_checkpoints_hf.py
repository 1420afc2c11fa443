"""Checkpoint loading and saving: source resolution, native format, HF directories, and bad input."""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmlab.checkpoints import (export_hf, from_hf_model, load_config, load_model, load_tokenizer, resolve,
                               save_model)
from lmlab.checkpoints import native
from lmlab.checkpoints.hf import rename_keys
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.model import Transformer
from parity import fp32_bound

TINY = ["tiny-decoder", "tiny-encoder", "tiny-encoder-decoder"]


def _tiny_gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        if model.config.arch == "encoder_decoder":
            return model(ids, decoder_input_ids=ids[:, :3])
        return model(ids)


# --- key maps ------------------------------------------------------------------------------------

def test_rename_keys_layer_patterns_ignore_and_passthrough():
    state = {"h.3.ln_1.weight": torch.zeros(1), "h.3.attn.bias": torch.zeros(1), "odd.key": torch.zeros(1)}
    out = rename_keys(state, [("h.{i}.ln_1.weight", "decoder.layers.{i}.attn_norm.weight")], ignore=[r"\.attn\.bias$"])
    assert set(out) == {"decoder.layers.3.attn_norm.weight", "odd.key"}


# --- native format -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_native_round_trip(tmp_path, name):
    model = Transformer(ModelConfig.from_name(name)).eval()
    save_model(model, tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert data["lmlab_format"] == 1
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    if model.config.tie_embeddings and model.lm_head is not None:
        assert "lm_head.weight" not in stored  # tied weights stored once
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    if loaded.config.tie_embeddings and loaded.lm_head is not None:
        assert loaded.lm_head.weight is loaded.tok_embed.weight


def test_native_load_dtype(tmp_path):
    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "c")
    assert load_model(tmp_path / "c", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_model(tmp_path / "c").dtype == torch.float32


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.from_name("tiny-decoder"))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no partial directory, no temp directory


def test_atomic_save_keeps_old_checkpoint_on_failure(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    save_model(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    monkeypatch.setattr(native, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_overwrites_existing_checkpoint(tmp_path):
    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "ckpt")
    other = Transformer(ModelConfig.from_name("tiny-encoder"))
    save_model(other, tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt").config.arch == "encoder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- HF directories ------------------------------------------------------------------------------

def test_sharded_safetensors_directory(tmp_path):
    hf = _tiny_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    ids = torch.randint(0, 64, (1, 8))
    ref = hf(input_ids=ids).logits
    assert (model(ids) - ref).abs().max() <= fp32_bound(ref, model.config)  # rounding only (tests/parity.py)


def test_pytorch_model_bin_directory(tmp_path):
    hf = _tiny_gpt2()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_model(tmp_path)
    ids = torch.randint(0, 64, (1, 8))
    ref = hf(input_ids=ids).logits
    assert (model(ids) - ref).abs().max() <= fp32_bound(ref, model.config)  # rounding only (tests/parity.py)


def test_gpt2_model_without_lm_head_prefix(tmp_path):
    """GPT2Model checkpoints (no 'transformer.' prefix, no lm_head) load with the head tied."""
    hf = _tiny_gpt2()
    hf.transformer.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 64, (1, 8))
    ref = hf(input_ids=ids).logits
    assert (model(ids) - ref).abs().max() <= fp32_bound(ref, model.config)  # rounding only (tests/parity.py)


def test_export_writes_tokenizer(tmp_path, minilm_path):
    model = load_model(minilm_path)
    export_hf(model, tmp_path / "out", tokenizer=load_tokenizer(minilm_path))
    assert (tmp_path / "out" / "tokenizer.json").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok("hello world")["input_ids"] == transformers.AutoTokenizer.from_pretrained(minilm_path)("hello world")["input_ids"]


def test_export_rejects_unrepresentable_config(tmp_path):
    cfg = ModelConfig.from_name("transformer-base", n_layers=1, vocab_size=64, d_model=32, n_heads=2, d_ff=64)
    with pytest.raises(CheckpointError, match="no Hugging Face family"):
        export_hf(Transformer(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- registry and sources ------------------------------------------------------------------------

def test_registry_resolves_offline_copies(smollm2_path, minilm_path):
    assert resolve("smollm2-135m-instruct").path.suffix == ".gguf"
    assert resolve("smollm2-135m-instruct").kind == "gguf"
    where = resolve("all-minilm-l6-v2")
    assert where.kind == "hf" and where.path == minilm_path


def test_gguf_config_is_read_from_metadata(smollm2_path):
    cfg, where = load_config("smollm2-135m-instruct")
    assert where.kind == "gguf"
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)


def test_load_model_from_gguf(smollm2_path):
    model = load_model(smollm2_path)
    assert model.config.n_layers == 30 and not model.training
    assert model.dtype == torch.float32


def test_load_tokenizer_sources(smollm2_path, minilm_path):
    assert load_tokenizer("all-minilm-l6-v2").encode("hello world") == \
        transformers.AutoTokenizer.from_pretrained(minilm_path)("hello world", add_special_tokens=False)["input_ids"]
    assert load_tokenizer("smollm2-135m-instruct").vocab_size == 49152


def test_hub_id_offline_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match=r"lmlab-test-org/no-such-model.*local directory or \.gguf"):
        load_model("lmlab-test-org/no-such-model")


def test_unknown_source_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not-a-model"):
        load_model("not-a-model")
    with pytest.raises(CheckpointError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")


# --- bad checkpoints -----------------------------------------------------------------------------

@pytest.fixture
def gpt2_dir(tmp_path):
    _tiny_gpt2().save_pretrained(tmp_path)
    return tmp_path


def test_missing_key_is_named(gpt2_dir):
    state = load_file(gpt2_dir / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, gpt2_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) decoder\.layers\.1\.ffn\.up\.bias"):
        load_model(gpt2_dir)


def test_unexpected_key_is_named(gpt2_dir):
    state = load_file(gpt2_dir / "model.safetensors")
    state["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
    save_file(state, gpt2_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) h\.0\.attn\.extra\.weight"):
        load_model(gpt2_dir)


def test_wrong_shape_names_key_and_both_shapes(gpt2_dir):
    state = load_file(gpt2_dir / "model.safetensors")
    state["transformer.h.0.mlp.c_proj.weight"] = torch.zeros(100, 32)  # Conv1D (in, out): model expects (128, 32)
    save_file(state, gpt2_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"key decoder\.layers\.0\.ffn\.down\.weight: checkpoint has shape "
                                              r"\(32, 100\), model expects \(32, 128\)"):
        load_model(gpt2_dir)


def test_truncated_safetensors_names_file(gpt2_dir):
    path = gpt2_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(gpt2_dir)


def test_unknown_model_type_lists_supported(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["model_type"] = "mamba"
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type='mamba' is not supported; supported model types: .*gpt2.*llama.*t5"):
        load_model(gpt2_dir)


def test_unknown_activation_is_named(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["activation_function"] = "quick_gelu"
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act='quick_gelu' is not supported"):
        load_model(gpt2_dir)


def test_unknown_architecture_in_memory_model():
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                            num_attention_heads=2, vocab_size=32, word_embed_proj_dim=16))
    with pytest.raises(CheckpointError, match="model_type='opt' is not supported"):
        from_hf_model(hf)


def test_native_config_with_bad_version(tmp_path):
    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    data["lmlab_format"] = 99
    (tmp_path / "c" / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="lmlab_format=99"):
        load_model(tmp_path / "c")


def test_model_type_inferred_from_architectures(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    del config["model_type"]
    config["architectures"] = ["GPT2LMHeadModel"]
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    assert load_model(gpt2_dir).config.extra["hf_model_type"] == "gpt2"
    config["architectures"] = ["MambaForCausalLM"]
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"architectures=\['MambaForCausalLM'\] is not supported; supported "
                                              r"architectures: GPT2\*"):
        load_model(gpt2_dir)


def test_save_model_with_tokenizer(tmp_path, minilm_path):
    tok = load_tokenizer(minilm_path)
    save_model(Transformer(ModelConfig.from_name("tiny-encoder")), tmp_path / "c", tokenizer=tok)
    assert load_tokenizer(tmp_path / "c").encode("hello world") == tok.encode("hello world")


def test_saved_files_get_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "c")
    finally:
        os.umask(umask)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "c" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_hub_id_is_downloaded_with_snapshot_download(gpt2_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(gpt2_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("some-org/tiny-gpt2")
    assert calls == ["some-org/tiny-gpt2"] and model.config.extra["hf_model_type"] == "gpt2"


def test_dtype_by_name(tmp_path):
    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "c")
    assert load_model(tmp_path / "c", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="dtype='float8'"):
        load_model(tmp_path / "c", dtype="float8")


def test_config_of_hub_id_downloads_only_config_json(gpt2_dir, monkeypatch):
    import huggingface_hub

    patterns = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        patterns.append(allow_patterns)
        return str(gpt2_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg, where = load_config("some-org/tiny-gpt2")
    assert patterns == [["config.json"]] and cfg.n_layers == 2 and where.kind == "hf"


# --- building without a second copy ---------------------------------------------------------------

def test_build_model_takes_the_state_tensors_without_initialising_or_copying():
    """build_model assigns fp32 state tensors as the parameters (no random init, no second copy of the
    weights); a tied head is re-tied, a view is given storage of its own, computed buffers stay real."""
    from lmlab.checkpoints.hf import build_model

    cfg = ModelConfig.from_name("tiny-decoder").replace(tie_embeddings=True, positional="rope")
    reference = Transformer(cfg)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    fused = torch.randn(2 * cfg.d_model, cfg.d_model)  # a converter's split: q is a view of a larger tensor
    state["decoder.layers.0.attn.q.weight"] = fused[:cfg.d_model]
    model = build_model(cfg, state)

    embed = state["decoder.layers.1.ffn.up.weight"]
    assert model.decoder.layers[1].ffn.up.weight.data_ptr() == embed.data_ptr()  # taken, not copied
    assert model.lm_head.weight is model.tok_embed.weight
    q = model.decoder.layers[0].attn.q.weight
    assert q.data_ptr() != fused.data_ptr() and q.untyped_storage().nbytes() == q.numel() * 4
    assert torch.equal(q, fused[:cfg.d_model])
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    assert torch.equal(model.decoder.rotary.inv_freq, reference.decoder.rotary.inv_freq)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    reference.decoder.layers[0].attn.q.weight.data.copy_(fused[:cfg.d_model])
    with torch.no_grad():
        assert torch.equal(model(ids), reference.eval()(ids))
