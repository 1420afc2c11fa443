"""lmlab.scaling and `lmlab plan`: memory estimates against independent arithmetic and a measured forward+backward,
Chinchilla planning against the paper's own model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab import scaling
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.model import Transformer

GPT2_PARAMS = 124_439_808  # GPT-2 small with tied embeddings (the published "124M")


@pytest.fixture
def gpt2():
    cfg = ModelConfig.from_name("gpt2-124m")
    assert cfg.num_parameters() == GPT2_PARAMS
    return cfg


# --- model states ---------------------------------------------------------------------------------

def test_adamw_fp32_single_gpu_is_16_bytes_per_param(gpt2):
    m = scaling.training_memory(gpt2, batch=1, seq_len=1024, precision="fp32", optimizer="adamw")
    assert (m.parameters, m.gradients, m.optimizer, m.gathered) == (4 * GPT2_PARAMS, 4 * GPT2_PARAMS, 8 * GPT2_PARAMS, 0)
    assert m.parameters + m.gradients + m.optimizer == 16 * GPT2_PARAMS
    assert m.total == 16 * GPT2_PARAMS + m.activations


def test_bf16_mixed_is_2_2_12_bytes_per_param(gpt2):
    # bf16 params, bf16 grads; fp32 master copy + two fp32 AdamW moments live with the optimizer
    m = scaling.training_memory(gpt2, batch=1, seq_len=1024, precision="bf16-mixed", optimizer="adamw")
    assert (m.parameters, m.gradients, m.optimizer) == (2 * GPT2_PARAMS, 2 * GPT2_PARAMS, 12 * GPT2_PARAMS)


@pytest.mark.parametrize("precision,optimizer,expected", [
    ("fp32", "sgd", 0), ("fp32", "sgd-momentum", 4), ("bf16-mixed", "sgd", 4), ("bf16-mixed", "sgd-momentum", 8),
])
def test_optimizer_state_bytes(precision, optimizer, expected):
    assert scaling.state_bytes_per_param(precision, optimizer)["optimizer"] == expected


def test_zero_stages_shard_the_right_terms(gpt2):
    n_ranks = 8
    kw = dict(batch=2, seq_len=512, precision="bf16-mixed", optimizer="adamw")
    single = scaling.training_memory(gpt2, strategy="single", **kw)
    by = {s: scaling.training_memory(gpt2, strategy=s, world_size=n_ranks, **kw) for s in scaling.STRATEGIES[1:]}
    P, G, O = 2 * GPT2_PARAMS, 2 * GPT2_PARAMS, 12 * GPT2_PARAMS
    assert (by["ddp"].parameters, by["ddp"].gradients, by["ddp"].optimizer) == (P, G, O)
    assert (by["zero1"].parameters, by["zero1"].gradients, by["zero1"].optimizer) == (P, G, O / n_ranks)
    assert (by["zero2"].parameters, by["zero2"].gradients, by["zero2"].optimizer) == (P, G / n_ranks, O / n_ranks)
    block = 12 * 768 ** 2 + 13 * 768  # GPT-2 block: qkv+proj 4h^2+4h, mlp 8h^2+5h, two LayerNorms 4h
    rest = GPT2_PARAMS - 12 * block  # wte + wpe + ln_f: the root FSDP unit, bigger than a block here
    assert rest == 50257 * 768 + 1024 * 768 + 2 * 768
    for s in ("zero3", "fsdp"):
        assert (by[s].parameters, by[s].gradients, by[s].optimizer) == (P / n_ranks, G / n_ranks, O / n_ranks)
        assert by[s].gathered == 2 * max(block, rest)
    for s in ("ddp", "zero1", "zero2"):
        assert by[s].gathered == 0
    assert {m.activations for m in by.values()} == {single.activations}  # data parallelism never shards activations
    assert single.total > by["zero1"].total > by["zero2"].total > by["fsdp"].total


def test_layer_parameters_matches_the_model():
    for name in ("tiny-decoder", "tiny-encoder", "tiny-encoder-decoder"):
        cfg = ModelConfig.from_name(name)
        model = Transformer(cfg)
        stack = model.decoder if model.decoder is not None else model.encoder
        assert scaling.layer_parameters(cfg) == sum(p.numel() for p in stack.layers[0].parameters()), name


def test_training_memory_rejects_bad_input(gpt2):
    with pytest.raises(ConfigError, match="world_size=8"):
        scaling.training_memory(gpt2, 1, 128, strategy="single", world_size=8)
    with pytest.raises(ConfigError, match="'zero4'"):
        scaling.training_memory(gpt2, 1, 128, strategy="zero4", world_size=8)
    with pytest.raises(ConfigError, match="'fp8'"):
        scaling.training_memory(gpt2, 1, 128, precision="fp8")
    with pytest.raises(ConfigError, match="'adam'"):
        scaling.training_memory(gpt2, 1, 128, optimizer="adam")
    with pytest.raises(ConfigError, match="batch=0"):
        scaling.training_memory(gpt2, 0, 128)


def test_fits(gpt2):
    m = scaling.training_memory(gpt2, 4, 1024)
    assert m.fits(m.total) and not m.fits(m.total - 1)
    i = scaling.inference_memory(gpt2, "bf16", 1, 1024)
    assert i.fits(i.total) and not i.fits(i.total - 1)
    assert m.as_dict()["total"] == m.total


# --- inference ------------------------------------------------------------------------------------

def test_kv_cache_smollm2_fp32_is_46080_bytes_per_token():
    cfg = ModelConfig.from_name("smollm2-135m")
    per_token = 30 * 2 * 3 * 64 * 4  # layers x (k, v) x kv heads x head_dim x fp32
    assert per_token == 46_080
    assert scaling.inference_memory(cfg, "fp32", batch=1, seq_len=1).kv_cache == per_token
    assert scaling.inference_memory(cfg, "fp32", batch=4, seq_len=2048).kv_cache == per_token * 4 * 2048
    assert scaling.inference_memory(cfg, "fp32", batch=1, seq_len=10, kv_dtype="bf16").kv_cache == per_token * 10 / 2


def test_kv_cache_encoder_decoder_adds_cross_attention_and_encoder_has_none():
    t5 = ModelConfig.from_name("t5-small")
    per_token = 6 * 2 * 8 * 64 * 4
    assert scaling.kv_cache_bytes(t5, 1, seq_len=10, kv_dtype="fp32", encoder_len=30) == per_token * (10 + 30)
    assert scaling.inference_memory(t5, "fp32", 2, 100).kv_cache == per_token * 2 * (100 + 100)
    assert scaling.inference_memory(ModelConfig.from_name("bert-base"), "fp32", 1, 512).kv_cache == 0


def test_inference_weights_and_activations(gpt2):
    for dtype, per_param in (("fp32", 4), ("bf16", 2), ("fp16", 2), ("int8", 1), ("int4", 0.5)):
        assert scaling.inference_memory(gpt2, dtype).weights == GPT2_PARAMS * per_param
    m = scaling.inference_memory(gpt2, "fp32", batch=1, seq_len=1024)
    assert m.seq_len == 1024 and scaling.inference_memory(gpt2, "fp32").seq_len == gpt2.max_seq_len
    assert m.activations == 1024 * 4 * (2 * 768 + 3072) + 1024 * 50257 * 4  # FFN working set + logits
    eager = scaling.inference_memory(gpt2, "fp32", batch=1, seq_len=1024, attention="eager")
    assert eager.activations - m.activations == 12 * 1024 ** 2 * 4  # one layer's a x s x s scores
    q = scaling.inference_memory(gpt2, "int4", batch=1, seq_len=1024)  # quantised weights run in fp16
    assert q.kv_cache == m.kv_cache / 2 and q.activations == m.activations / 2
    assert m.total == m.weights + m.kv_cache + m.activations
    with pytest.raises(ConfigError, match="'int3'"):
        scaling.inference_memory(gpt2, "int3")


# --- activations ----------------------------------------------------------------------------------

def test_layer_activations_reduce_to_korthikanti_for_gpt(gpt2):
    cfg = gpt2.replace(dropout=0.1, attn_dropout=0.1)
    s, b, h, a = 1024, 4, 768, 12
    paper = s * b * h * (34 + 5 * a * s / h)  # Korthikanti et al. 2022, 16-bit with dropout, eager attention
    assert scaling.korthikanti_layer_bytes(b, s, h, a) == paper
    assert scaling.layer_activation_bytes(cfg, b, s, "bf16-mixed", attention="eager") == pytest.approx(paper)
    # without dropout there are no 1-byte masks, so fp32 is exactly twice 16-bit
    assert scaling.layer_activation_bytes(gpt2, b, s, "fp32", "eager") == 2 * scaling.layer_activation_bytes(
        gpt2, b, s, "bf16-mixed", "eager")
    # fused attention drops the quadratic term
    flash = scaling.layer_activation_bytes(gpt2, b, 2 * s, "bf16-mixed", "flash")
    assert flash == pytest.approx(2 * scaling.layer_activation_bytes(gpt2, b, s, "bf16-mixed", "flash"))


def test_activation_checkpointing_keeps_block_inputs_plus_one_block(gpt2):
    s, b, h = 1024, 4, 768
    full = scaling.activation_bytes(gpt2, b, s, "bf16-mixed", activation_checkpointing=False)
    ckpt = scaling.activation_bytes(gpt2, b, s, "bf16-mixed", activation_checkpointing=True)
    layer = scaling.layer_activation_bytes(gpt2, b, s, "bf16-mixed", "flash")
    head = s * b * 2 * h * 2 + s * b * 50257 * 4
    assert full == pytest.approx(12 * layer + head)
    assert ckpt == pytest.approx(12 * 2 * s * b * h + layer + head)  # 2sbh per layer (16-bit), one recomputed


def _saved_tensor_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward + cross-entropy (parameters excluded)."""
    model = Transformer(cfg).to(dtype).train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()  # views share a storage: count it once
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        extra = {"decoder_input_ids": ids} if cfg.arch == "encoder_decoder" else {}
        logits = model(ids, **extra)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()  # the graph really needed what was saved
    return sum(saved.values())


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-decoder", dict(d_model=128, n_heads=4, n_kv_heads=2, d_ff=384)),  # llama: RMSNorm, SwiGLU, GQA, RoPE
    ("gpt2-124m", dict(d_model=128, n_heads=4, d_ff=512, n_layers=2, vocab_size=256, max_seq_len=128)),
    ("gpt2-124m", dict(d_model=128, n_heads=4, d_ff=512, n_layers=2, vocab_size=256, max_seq_len=128, dropout=0.1)),
    ("tiny-encoder", dict(d_model=128, d_ff=512)),  # BERT: post-norm, MLM head
    ("tiny-encoder-decoder", dict(d_model=128, head_dim=32, d_ff=384)),  # T5: cross-attention, relative bias
])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16-mixed")])
def test_activation_estimate_within_50_percent_of_measured(preset, overrides, dtype, precision):
    cfg = ModelConfig.from_name(preset, **overrides)
    batch, seq_len = 2, 64
    measured = _saved_tensor_bytes(cfg, batch, seq_len, dtype)
    estimate = scaling.activation_bytes(cfg, batch, seq_len, precision, attention="flash")
    assert 0.5 <= estimate / measured <= 1.5, (estimate, measured)
    # the estimate follows the measurement when the shape changes (not a constant that happens to fit)
    measured2 = _saved_tensor_bytes(cfg, 2 * batch, seq_len, dtype)
    assert 0.5 <= scaling.activation_bytes(cfg, 2 * batch, seq_len, precision) / measured2 <= 1.5
    assert measured2 == pytest.approx(2 * measured, rel=0.05)


# --- Chinchilla ----------------------------------------------------------------------------------

def test_training_flops_is_6nd():
    assert scaling.training_flops(70e9, 1.4e12) == pytest.approx(5.88e23)
    assert scaling.training_flops(1, 1) == 6


def test_chinchilla_optimal_recovers_chinchilla():
    plan = scaling.chinchilla_optimal(compute_flops=5.76e23)  # Chinchilla's budget (same as Gopher's)
    assert plan.n_params == pytest.approx(70e9, rel=0.10)
    assert plan.n_tokens == pytest.approx(1.4e12, rel=0.10)
    assert plan.flops == pytest.approx(5.76e23, rel=1e-12)
    assert plan.n_tokens == pytest.approx(20 * plan.n_params)


def test_chinchilla_optimal_from_params_or_tokens():
    by_n = scaling.chinchilla_optimal(n_params=125e6)
    assert (by_n.n_tokens, by_n.flops) == (pytest.approx(2.5e9), pytest.approx(6 * 125e6 * 2.5e9))
    by_d = scaling.chinchilla_optimal(n_tokens=2.5e9)
    assert by_d.n_params == pytest.approx(125e6)
    assert scaling.chinchilla_optimal(n_params=1e9, tokens_per_param=100).n_tokens == pytest.approx(1e11)
    with pytest.raises(ConfigError, match="exactly one"):
        scaling.chinchilla_optimal(compute_flops=1e21, n_params=1e9)
    with pytest.raises(ConfigError, match="exactly one"):
        scaling.chinchilla_optimal()
    with pytest.raises(ConfigError, match="n_params=-5"):
        scaling.chinchilla_optimal(n_params=-5)


def test_chinchilla_loss_at_known_points():
    # Chinchilla (70B params, 1.4T tokens): 1.69 + 406.4/70e9^0.34 + 410.7/1.4e12^0.28 = 1.69 + 0.0837 + 0.1632
    assert scaling.chinchilla_loss(70e9, 1.4e12) == pytest.approx(1.9369, abs=5e-4)
    assert scaling.chinchilla_loss(1e9, 20e9) == pytest.approx(1.69 + 406.4 / 1e9 ** 0.34 + 410.7 / 20e9 ** 0.28)
    assert scaling.chinchilla_loss(1e30, 1e30) == pytest.approx(1.69, abs=1e-5)  # the irreducible loss E
    assert scaling.chinchilla_optimal(n_params=70e9).loss == scaling.chinchilla_loss(70e9, 1.4e12)


def test_training_time():
    assert scaling.training_time(1e21, peak_flops=1e15, mfu=0.5, n_devices=4) == pytest.approx(5e5)
    assert scaling.training_time(1e21, 1e15) == pytest.approx(1e21 / 4e14)
    with pytest.raises(ConfigError, match="mfu=1.5"):
        scaling.training_time(1e21, 1e15, mfu=1.5)
    with pytest.raises(ConfigError, match="peak_flops=0"):
        scaling.training_time(1e21, 0)


# --- parsing and formatting -------------------------------------------------------------------------

def test_parse_human_numbers():
    assert scaling.parse_count("125M") == 125e6
    assert scaling.parse_count("2.5B") == 2.5e9
    assert scaling.parse_count("1.4t") == 1.4e12
    assert scaling.parse_count("1e21") == 1e21
    assert scaling.parse_count("989T") == 989e12
    assert scaling.parse_bytes("80GiB") == 80 * 2 ** 30
    assert scaling.parse_bytes("80GB") == 80e9
    assert scaling.parse_bytes("512 MiB") == 512 * 2 ** 20
    for bad in ("12X", "", "M", "-5M", "0"):
        with pytest.raises(ConfigError, match="--params"):
            scaling.parse_count(bad, "--params")
    with pytest.raises(ConfigError, match="'80QB'"):
        scaling.parse_bytes("80QB")


def test_format_helpers():
    assert scaling.format_bytes(1536) == "1.50 KiB"
    assert scaling.format_bytes(80 * 2 ** 30) == "80.00 GiB"
    assert scaling.format_count(69.3e9) == "69.3B"
    assert scaling.format_duration(90) == "1.5 min"
    assert scaling.format_duration(3 * 86400) == "3.0 days"


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli_plan_memory_table(capsys, gpt2):
    argv = ["plan", "memory", "gpt2-124m", "--batch", "8", "--seq-len", "1024", "--precision", "bf16-mixed",
            "--world-size", "8", "--gpu-memory", "80GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for s in ("single", "ddp", "zero1", "zero2", "fsdp"):
        m = scaling.training_memory(gpt2, 8, 1024, "bf16-mixed", "adamw", s, 1 if s == "single" else 8)
        row = next(line for line in out.splitlines() if line.startswith(s))
        assert scaling.format_bytes(m.total) in row and row.rstrip().endswith("yes"), row
    assert "124,439,808 parameters" in out and "inference" in out
    assert scaling.format_bytes(scaling.inference_memory(gpt2, "bf16", 8, 1024).kv_cache) in out


def test_cli_plan_memory_says_what_does_not_fit(capsys):
    assert main(["plan", "memory", "smollm2-135m", "--seq-len", "2048", "--gpu-memory", "4GiB",
                 "--activation-checkpointing", "--strategy", "single,zero3"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith(("single", "zero3"))}
    assert rows["single"].rstrip().endswith("NO") and "zero3" in rows


def test_cli_plan_memory_reads_a_checkpoint_config(tmp_path, capsys):
    from lmlab.checkpoints import save_model

    cfg = ModelConfig.from_name("tiny-decoder")
    save_model(Transformer(cfg), tmp_path / "ckpt")
    assert main(["plan", "memory", str(tmp_path / "ckpt"), "--json", "--world-size", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == cfg.num_parameters()
    assert data["training"]["zero1"]["optimizer"] == 12 * cfg.num_parameters() / 2


def test_cli_plan_chinchilla(capsys):
    assert main(["plan", "chinchilla", "--compute", "5.76e23"]) == 0
    out = capsys.readouterr().out
    assert "69.3B" in out and "1.39T" in out and "1.937" in out and "32.2B params" in out
    assert main(["plan", "chinchilla", "--params", "125M", "--peak-flops", "1P", "--mfu", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_tokens"] == pytest.approx(2.5e9)
    assert data["training_seconds"] == pytest.approx(6 * 125e6 * 2.5e9 / 0.5e15)
    assert main(["plan", "chinchilla", "--tokens", "2.5B"]) == 0
    assert "125M" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "chinchilla", "--params", "12X"], "'12X'"),
    (["plan", "chinchilla", "--compute", "1e21", "--mfu", "2"], "mfu=2"),
    (["plan", "memory", "gpt2-124m", "--gpu-memory", "80QB"], "'80QB'"),
    (["plan", "memory", "gpt2-124m", "--strategy", "zero9"], "'zero9'"),
    (["plan", "memory", "gpt2-124m", "--precision", "fp8"], "'fp8'"),
    (["plan", "memory", "no-such-model"], "'no-such-model'"),
])
def test_cli_plan_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and err.startswith("error: ")


def test_cli_plan_memory_real_gguf_config(smollm2_path, capsys):
    # SmolLM2-135M-Instruct's own GGUF metadata (no weights read): 30 layers x 2 x 3 kv heads x 64 x 4 bytes
    assert main(["plan", "memory", str(smollm2_path), "--batch", "1", "--seq-len", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inference"]["fp32"]["kv_cache"] == 46_080
    assert data["inference"]["bf16"]["weights"] == 2 * data["parameters"]


def test_non_block_parameters_match_the_model():
    small_gpt2 = dict(vocab_size=1000, d_model=64, n_heads=4, d_ff=256, n_layers=3)  # tied, learned positions
    for name, over in (("gpt2-124m", small_gpt2), ("tiny-encoder", {}), ("tiny-encoder-decoder", {})):
        cfg = ModelConfig.from_name(name, **over)
        model = Transformer(cfg)
        in_blocks = sum(p.numel() for stack in (model.encoder, model.decoder) if stack is not None
                        for p in stack.layers.parameters())
        assert scaling.non_block_parameters(cfg) == model.num_parameters() - in_blocks, name


def test_chinchilla_loss_optimal_minimises_the_fit():
    c = 5.76e23
    plan = scaling.chinchilla_loss_optimal(c)
    assert plan.flops == pytest.approx(c)
    # brute force: the loss along the iso-FLOP curve D = C/(6N) is lowest at the closed-form N
    grid = [10 ** (9 + i / 200) for i in range(601)]  # 1B .. 1T parameters
    best = min(grid, key=lambda n: scaling.chinchilla_loss(n, c / (6 * n)))
    assert plan.n_params == pytest.approx(best, rel=0.02)
    assert plan.loss <= scaling.chinchilla_optimal(compute_flops=c).loss


def test_scaling_is_arithmetic_that_imports_no_checkpoints_or_torch():
    """lmlab.checkpoints imports lmlab.scaling (for `lmlab info`); nothing in lmlab.scaling may import it back,
    not even inside a function, so there is no import circle, and `lmlab plan` on a preset needs no torch."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    package = Path(scaling.__file__).parent
    assert package.name == "scaling" and len(list(package.glob("*.py"))) >= 4  # split by subject
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("lmlab.checkpoints", "lmlab.model", "torch")), (path.name, name)
    code = ("import sys, lmlab.scaling, lmlab.commands.plan; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('lmlab.checkpoints')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
