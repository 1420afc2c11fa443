"""`lmlab info` and `lmlab export` through lmlab.cli.main."""

import json

import pytest
import torch
import transformers

from lmlab.checkpoints import save_model
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.model import Transformer
from parity import fp32_bound


@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg = ModelConfig.from_name("tiny-decoder")
    save_model(Transformer(cfg), tmp_path / "ckpt")
    return tmp_path / "ckpt", cfg


def test_info_prints_architecture_size_and_memory(tiny_ckpt, capsys):
    path, cfg = tiny_ckpt
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    n = cfg.num_parameters()
    assert str(path) in out and "(lmlab)" in out
    assert "decoder, family llama" in out
    assert "4 / 2" in out  # heads / kv heads
    assert f"{n:,}" in out and f"{n - 256 * 64:,} without embeddings" in out
    assert "128 tokens" in out and "256 tokens" in out  # context, vocabulary
    assert f"int8 {n / 1024:.2f} KiB" in out
    kv = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv_heads x head_dim x fp32
    assert f"{kv:,} bytes/token" in out


def test_info_json_matches_model(tiny_ckpt, capsys):
    path, cfg = tiny_ckpt
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = Transformer(cfg)
    assert info["parameters"] == model.num_parameters()
    assert info["parameters_without_embeddings"] == model.num_parameters(exclude_embeddings=True)
    assert info["weights_bytes"] == {"fp32": 4 * info["parameters"], "bf16": 2 * info["parameters"],
                                     "int8": info["parameters"]}


def test_info_gguf_reads_metadata(smollm2_path, capsys):
    assert main(["info", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "134,515,008" in out and "8,192 tokens" in out and "46,080 bytes/token" in out


def test_info_bad_path_exits_non_zero_with_one_line(tmp_path, capsys):
    bad = tmp_path / "nope"
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err


def test_export_writes_loadable_hf_directory(tiny_ckpt, tmp_path, capsys):
    path, cfg = tiny_ckpt
    assert main(["export", str(path), str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from lmlab.checkpoints import load_model

    model = load_model(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (model(ids) - ref).abs().max() <= fp32_bound(ref, model.config)  # rounding only (tests/parity.py)


def test_export_bad_source_exits_non_zero(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
