"""The AOTInductor decode engine (lmlab.engine.aoti): compiled steps against the eager model, driven by the
same decoding loops, and its on-disk cache (hits, corrupt entries, failed compiles, concurrent builders).

Compiles are slow (~30 s for a tiny model, minutes for SmolLM2), so each compiled bucket is built once per
module (fixtures) and reused by the tests that need it.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

import lmlab.generation.decode as decode
from lmlab.config import ModelConfig
from lmlab.engine import aoti
from lmlab.engine.aoti import AOTIEngine, AOTIRun, available, batch_bucket, capacity_bucket
from lmlab.generation import GenerationConfig, generate_tokens
from lmlab.generation.driver import DecoderOnlyRun, start_run
from lmlab.model import Transformer
from lmlab.quant.model import quantize_model

needs_compiler = pytest.mark.skipif(not available(Transformer(ModelConfig.from_name("tiny-decoder")))[0],
                                    reason=available(Transformer(ModelConfig.from_name("tiny-decoder")))[1])


def tiny_model(bits: int | None = None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", max_seq_len=256)).eval()
    if bits:
        quantize_model(model, bits)
    return model


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded by 3 (lengths 9 and 6)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def engine_tokens(engine: AOTIEngine, model, ids, mask, n: int, monkeypatch) -> list[list[int]]:
    """Greedy tokens from generate_tokens with the engine's run in place of the eager driver (same loops)."""
    def start(model_, input_ids, attention_mask, config, expand=1):
        _, history = start_run(model_, input_ids, attention_mask, config, expand)
        return engine.start(input_ids, attention_mask, config.max_new_tokens), history

    with monkeypatch.context() as m:
        m.setattr(decode, "start_run", start)
        return generate_tokens(model, ids, mask, GenerationConfig(max_new_tokens=n, eos_token_ids=[]))


def step_logits_error(engine: AOTIEngine, model, ids, mask, n: int) -> float:
    """Max |compiled - eager| over the prefill and n greedy steps, both runs fed the eager run's tokens."""
    with torch.inference_mode():
        compiled, eager = engine.start(ids, mask, n), DecoderOnlyRun(model, ids, mask, n)
        assert isinstance(compiled, AOTIRun)
        a, b = compiled.prefill(), eager.prefill()
        worst = (a - b).abs().max().item()
        for _ in range(n):
            tokens = b.argmax(-1)
            a, b = compiled.step(tokens), eager.step(tokens)
            worst = max(worst, (a - b).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory):
    model = tiny_model()
    engine = AOTIEngine(model, cache_dir=tmp_path_factory.mktemp("aoti"))
    engine.step_fn(2, 128)  # the one compile of the fp32 tests
    return engine


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert [capacity_bucket(n) for n in (1, 128, 129, 600)] == [128, 128, 256, 1024]
    with pytest.raises(Exception, match="33 rows"):
        batch_bucket(33)


def test_available_names_what_is_missing(monkeypatch):
    ok, why = available(Transformer(ModelConfig.from_name("tiny-encoder")))
    assert not ok and "arch='encoder'" in why
    monkeypatch.setattr(aoti, "_compiler", lambda: None)
    ok, why = available(tiny_model())
    assert not ok and "C++ compiler" in why


def test_no_compiler_falls_back_to_eager(monkeypatch, tmp_path):
    monkeypatch.setattr(aoti, "_compiler", lambda: None)
    model = tiny_model()
    ids, mask = padded_batch(model.config.vocab_size)
    with pytest.warns(UserWarning, match="running eager: no C\\+\\+ compiler"):
        run = AOTIEngine(model, cache_dir=tmp_path).start(ids, mask, 4)
    assert isinstance(run, DecoderOnlyRun)


def test_failed_compile_leaves_no_entry_and_runs_eager(monkeypatch, tmp_path):
    def broken(program, package_path, inductor_configs):
        with open(package_path, "wb") as f:  # half a package, then the compiler dies
            f.write(b"PK\x03\x04 half")
        raise RuntimeError("C++ compile error: simulated")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = tiny_model()
    ids, mask = padded_batch(model.config.vocab_size)
    with pytest.warns(UserWarning, match="compiling failed: RuntimeError: C\\+\\+ compile error"):
        run = AOTIEngine(model, cache_dir=tmp_path).start(ids, mask, 4)
    assert isinstance(run, DecoderOnlyRun)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_concurrent_builders_compile_once(monkeypatch, tmp_path):
    """Two builders of one entry: the second waits on the lock and loads what the first wrote."""
    calls = []

    def fake_compile(model, batch, capacity, target, configs):
        calls.append(target)
        time.sleep(0.3)
        target.write_bytes(b"package")

    monkeypatch.setattr(aoti, "_compile", fake_compile)
    monkeypatch.setattr(AOTIEngine, "_load", lambda self, target, b, c: (target.read_bytes(), ""))
    model = tiny_model()
    engines = [AOTIEngine(model, cache_dir=tmp_path) for _ in range(2)]
    out = []
    threads = [threading.Thread(target=lambda e=e: out.append(e.step_fn(1, 128))) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [b"package", b"package"] and len(calls) == 1
    assert [e.timings[0]["action"] for e in engines].count("compiled") == 1


def test_key_changes_with_weights_shapes_and_threads(tmp_path):
    model = tiny_model()
    engine = AOTIEngine(model, cache_dir=tmp_path)
    key = engine.key(2, 128)
    assert engine.key(4, 128) != key and engine.key(2, 256) != key
    other = tiny_model()
    with torch.no_grad():
        other.decoder.layers[1].ffn.down.weight[3, 5] += 1e-3
    assert AOTIEngine(other, cache_dir=tmp_path).key(2, 128) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert AOTIEngine(model, cache_dir=tmp_path).key(2, 128) != key  # the kernels' threading is compiled in
    finally:
        torch.set_num_threads(threads)


@needs_compiler
def test_fp32_step_logits_match_eager(fp32_engine):
    model = fp32_engine.model
    ids, mask = padded_batch(model.config.vocab_size)
    assert step_logits_error(fp32_engine, model, ids, mask, 20) < 1e-4


@needs_compiler
def test_fp32_greedy_tokens_identical_through_the_decoding_loop(fp32_engine, monkeypatch):
    model = fp32_engine.model
    ids, mask = padded_batch(model.config.vocab_size)
    eager = generate_tokens(model, ids, mask, GenerationConfig(max_new_tokens=30, eos_token_ids=[]))
    assert engine_tokens(fp32_engine, model, ids, mask, 30, monkeypatch) == eager
    # an unpadded pair: the same bucket, no mask
    pair = ids[:1].repeat(2, 1)
    eager = generate_tokens(model, pair, None, GenerationConfig(max_new_tokens=30, eos_token_ids=[]))
    assert engine_tokens(fp32_engine, model, pair, None, 30, monkeypatch) == eager


@needs_compiler
def test_fp32_reorder_keeps_rows_in_the_loaded_bucket(fp32_engine):
    """A row leaving the batch: 1 row left, bucket 1 not built, so the run stays in bucket 2 with a pad row."""
    model = fp32_engine.model
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.inference_mode():
        compiled, eager = fp32_engine.start(ids, mask, 12), DecoderOnlyRun(model, ids, mask, 12)
        a, b = compiled.prefill(), eager.prefill()
        for _ in range(3):
            tokens = b.argmax(-1)
            a, b = compiled.step(tokens), eager.step(tokens)
        keep = torch.tensor([1])
        compiled.reorder(keep)
        eager.reorder(keep)
        tokens = b.argmax(-1)[keep]
        for _ in range(5):
            a, b = compiled.step(tokens), eager.step(tokens)
            assert a.shape == b.shape == (1, model.config.vocab_size)
            assert (a - b).abs().max().item() < 1e-4
            tokens = b.argmax(-1)
    assert compiled.bucket == 2


@needs_compiler
def test_cache_hit_loads_fast_and_corrupt_entry_is_rebuilt(fp32_engine):
    model = fp32_engine.model
    again = AOTIEngine(model, cache_dir=fp32_engine.cache_dir)  # a new process's view: nothing loaded yet
    assert again.cached(2, 128)
    again.step_fn(2, 128)
    hit = again.timings[-1]
    assert hit["action"] == "loaded" and hit["seconds"] < 0.5, hit

    path = again.path(2, 128)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096  # damage the middle of the package
    path.write_bytes(bytes(data[: len(data) * 3 // 4]))  # and truncate it
    fresh = AOTIEngine(model, cache_dir=fp32_engine.cache_dir)
    with pytest.warns(UserWarning, match="unusable .*rebuilding it"):
        fresh.step_fn(2, 128)
    assert fresh.timings[-1]["action"] == "compiled"
    ids, mask = padded_batch(model.config.vocab_size)
    assert step_logits_error(fresh, model, ids, mask, 4) < 1e-4  # the rebuilt entry works
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reload = AOTIEngine(model, cache_dir=fp32_engine.cache_dir)
        reload.step_fn(2, 128)
    assert reload.timings[-1]["action"] == "loaded"


# measured on this machine (AVX-512 + AMX, torch 2.13) and with a margin for AVX2 machines: the compiled
# step rounds the bf16 operands of the integer kernels like the eager layers, but Inductor fuses the casts
# and the norms, so sums are taken in another order; see docs/engine-aoti.md
QUANT_TOLERANCE = {8: 2e-2, 4: 2e-2}


@needs_compiler
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_step_logits_close_to_eager(bits, tmp_path, monkeypatch):
    model = tiny_model(bits)
    engine = AOTIEngine(model, cache_dir=tmp_path)
    ids, mask = padded_batch(model.config.vocab_size)
    err = step_logits_error(engine, model, ids, mask, 20)
    print(f"int{bits}: max |compiled - eager| logit difference {err:.2e}")
    assert err < QUANT_TOLERANCE[bits]
    eager = generate_tokens(model, ids, mask, GenerationConfig(max_new_tokens=20, eos_token_ids=[]))
    assert engine_tokens(engine, model, ids, mask, 20, monkeypatch) == eager


@pytest.mark.slow
@needs_compiler
def test_smollm2_greedy_tokens_identical(smollm2_path, tmp_path, monkeypatch):
    import lmlab

    model = lmlab.load_model("smollm2-135m-instruct")
    tok = lmlab.load_tokenizer("smollm2-135m-instruct")
    prompts = ["The capital of France is", "Summarize: #Person1# asks #Person2# to bring the report by Monday."]
    ids, mask = tok.encode_batch(prompts, padding_side="left", add_special_tokens=True)
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    engine = AOTIEngine(model, cache_dir=tmp_path)
    eager = generate_tokens(model, ids, mask, GenerationConfig(max_new_tokens=24, eos_token_ids=[]))
    assert engine_tokens(engine, model, ids, mask, 24, monkeypatch) == eager
    assert step_logits_error(engine, model, ids, mask, 8) < 1e-3


def test_unwritable_cache_dir_runs_eager(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = tiny_model()
    ids, mask = padded_batch(model.config.vocab_size)
    with pytest.warns(UserWarning, match="cannot use the cache directory"):
        run = AOTIEngine(model, cache_dir=blocker / "aoti").start(ids, mask, 4)
    assert isinstance(run, DecoderOnlyRun)


@needs_compiler
def test_generate_runs_the_aoti_engine_through_the_registry(monkeypatch, tmp_path):
    """--engine aoti / LMLAB_ENGINE=aoti: the generation driver itself picks the compiled step (no test
    double in between), and its greedy tokens on a padded batch equal the eager driver's."""
    import lmlab.engine as engines

    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path))
    model = tiny_model()
    ids, mask = padded_batch(model.config.vocab_size)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=[])
    monkeypatch.setenv("LMLAB_ENGINE", "eager")
    assert engines.select(model) is None
    eager = generate_tokens(model, ids, mask, config)
    monkeypatch.setenv("LMLAB_ENGINE", "aoti")
    assert isinstance(engines.select(model), AOTIEngine)
    assert generate_tokens(model, ids, mask, config) == eager
    assert list(tmp_path.rglob("*.pt2")), "no compiled package was written: the eager path ran"
