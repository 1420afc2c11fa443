"""The training loop: learning, exact resume, atomic checkpoints, signals, errors, final model, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.corpus import iter_documents
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.objectives import CausalLM
from lmlab.tokenizer_train import train_tokenizer
from lmlab.training import TrainingError, load_config, pretrain
from lmlab.training.state import load_checkpoint
from lmlab.training.optim import lr_factor, param_groups
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while dogs ran in the park and birds sang songs about summer rain "
         "person one asked person two where the train station was and they walked there together").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small JSONL corpus and a BPE tokenizer (with sentinels, so every objective can use it)."""
    import numpy as np

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(10, 40))) for _ in range(300)]
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"dialogue": d}) + "\n" for d in docs))
    tok = root / "tok"
    train_tokenizer(iter_documents([path], "dialogue"), vocab_size=320, n_sentinels=16, out_dir=tok, show_progress=False)
    return path, tok


def _cfg(out, corpus, *sets, preset="tiny"):
    path, tok = corpus
    # pinned to the CPU: exact-resume and accumulation checks assume its deterministic kernels; pinned to fp32:
    # "auto" is bf16 on a CPU with native bf16, and these checks assert fp32 tolerances (bf16 tests say bf16)
    return load_config(preset, [f"out_dir={out}", f"data.files=[{path}]", "data.field=dialogue",
                                f"data.tokenizer={tok}", "train.device=cpu", "train.precision=fp32", *sets])


def _params(out):
    return load_checkpoint(Path(out) / "checkpoint.pt")["model"]


# --- optimizer and schedule ----------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1) == lr_factor(500, 10, 100, 0.1)


def test_weight_decay_only_on_linear_matrices():
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer

    model = Transformer(ModelConfig.from_name("tiny-encoder"))  # learned positions, token types, biases, MLM head
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert "tok_embed.weight" not in decayed and "pos_embed.weight" not in decayed and "type_embed.weight" not in decayed
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}  # head is tied
    assert decayed == {f"{n}.weight" for n in linear}
    n_total = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_total  # every parameter exactly once


# --- the loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,objective", [("tiny-decoder", "clm"), ("tiny-encoder", "mlm"),
                                              ("tiny-encoder-decoder", "span")])
def test_each_objective_trains(tmp_path, corpus, preset, objective):
    s = pretrain(_cfg(tmp_path, corpus, f"model.preset={preset}", "train.steps=16", "train.eval_every=0"),
                 show_progress=False)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert s["objective"] == objective and s["finished"] and len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses  # it learns
    assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1.5


@pytest.mark.parametrize("preset", ["tiny-decoder", "tiny-encoder", "tiny-encoder-decoder"])
def test_resume_is_bit_identical(tmp_path, corpus, preset):
    # dropout > 0 so the restored torch RNG state matters; 6 steps straight vs 3 + resume + 3
    sets = [f"model.preset={preset}", "model.dropout=0.1", "train.steps=6", "train.eval_every=2", "train.ckpt_every=0"]
    pretrain(_cfg(tmp_path / "a", corpus, *sets), show_progress=False)
    s = pretrain(_cfg(tmp_path / "b", corpus, *sets, "train.stop_after=3"), show_progress=False)
    assert s["step"] == 3 and not s["finished"] and not (tmp_path / "b" / "model.safetensors").exists()
    pretrain(_cfg(tmp_path / "b", corpus, *sets), resume=True, show_progress=False)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gradient_accumulation_matches_the_big_batch(tmp_path, corpus):
    pretrain(_cfg(tmp_path / "a", corpus, "train.steps=4", "train.batch_size=4"), show_progress=False)
    pretrain(_cfg(tmp_path / "b", corpus, "train.steps=4", "train.batch_size=2", "train.grad_accum=2"),
             show_progress=False)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in a:  # the same blocks and the same token-mean gradient; only summation order differs
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all the weights of two state dicts."""
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a])
    return (diff.norm() / torch.cat([a[k].float().flatten() for k in a]).norm()).item()


def test_gradient_accumulation_matches_the_big_batch_in_bf16(tmp_path, corpus):
    """The bf16 autocast path, with a bound reasoned for bf16.

    Autocast rounds every matmul input to bf16 (8 significant bits: one rounding is at most 2**-9 relative).
    The micro-batches and the big batch round the same values the same way, except where an fp32 sum taken
    in another order (other kernel blocking, two gradient halves added) lands on the other side of a bf16
    rounding boundary: that activation then differs by one bf16 step, 2**-8 relative. Such flips are rare,
    and AdamW moves every weight by at most ~lr per step whatever its gradient, so the two runs' weights
    must stay within one bf16 step of each other in norm: ||a - b|| / ||a|| < 2**-8 (measured ~4e-4, and
    fp32-vs-bf16 runs of the same batch ~1e-3). The fp32 test's elementwise rtol=1e-4, atol=1e-6 does not
    hold here (a native-bf16 CPU put 40% of the weights outside it): the flips spread through each step.
    A wrong accumulation is far outside the bound: training on one micro-batch per step instead of both
    (the check below) moves the weights ~4e-2 away.
    """
    sets = ("train.steps=4", "train.precision=bf16")
    pretrain(_cfg(tmp_path / "a", corpus, *sets, "train.batch_size=4"), show_progress=False)
    pretrain(_cfg(tmp_path / "b", corpus, *sets, "train.batch_size=2", "train.grad_accum=2"), show_progress=False)
    pretrain(_cfg(tmp_path / "half", corpus, *sets, "train.batch_size=2"), show_progress=False)
    a, b, half = _params(tmp_path / "a"), _params(tmp_path / "b"), _params(tmp_path / "half")
    assert _relative_distance(a, b) < 2 ** -8
    assert _relative_distance(a, half) > 4 * 2 ** -8  # the bound tells a wrong accumulation apart


def test_nan_loss_aborts_naming_the_step(tmp_path, corpus, monkeypatch):
    real = CausalLM.loss
    calls = {"n": 0}

    def flaky(self, model, batch):
        calls["n"] += 1
        loss, n = real(self, model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), n

    monkeypatch.setattr(CausalLM, "loss", flaky)
    with pytest.raises(TrainingError, match="loss became nan at step 5"):
        pretrain(_cfg(tmp_path, corpus, "train.eval_every=0", "train.ckpt_every=2"), show_progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["loop"]["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_final_model_is_saved_in_lmlab_format(tmp_path, corpus):
    pretrain(_cfg(tmp_path, corpus, "train.steps=2"), show_progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lmlab_format"] == 1 and config["vocab_size"] == 320 and config["tie_embeddings"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied weights stored once
    assert torch.equal(weights["tok_embed.weight"], _params(tmp_path)["tok_embed.weight"])
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "loss.png").stat().st_size > 1000
    from lmlab.checkpoints import load_model

    model = load_model(tmp_path)
    assert torch.equal(model.tok_embed.weight, weights["tok_embed.weight"])


# --- bad input: clear errors, nothing overwritten ----------------------------------------------------
def test_unknown_keys_are_named(tmp_path, corpus):
    with pytest.raises(ConfigError, match="train.lrr"):
        _cfg(tmp_path, corpus, "train.lrr=1")
    with pytest.raises(ConfigError, match="optimiser"):
        _cfg(tmp_path, corpus, "optimiser.lr=1")
    with pytest.raises(ConfigError, match="model.d_modle"):
        _cfg(tmp_path, corpus, "model.d_modle=3")
    with pytest.raises(ConfigError, match="'nope'"):
        load_config("nope")


def test_missing_data_and_too_small_corpus(tmp_path, corpus):
    with pytest.raises(DataError, match="missing.jsonl"):
        pretrain(_cfg(tmp_path, corpus, f"data.files=[{tmp_path / 'missing.jsonl'}]"), show_progress=False)
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"dialogue": "the cat"}) + "\n")
    with pytest.raises(DataError, match="fewer than one block"):
        pretrain(_cfg(tmp_path / "r", corpus, f"data.files=[{small}]"), show_progress=False)


def test_existing_run_and_wrong_architecture_are_refused_without_overwriting(tmp_path, corpus):
    pretrain(_cfg(tmp_path, corpus, "train.steps=2"), show_progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(_cfg(tmp_path, corpus, "train.steps=2"), show_progress=False)
    with pytest.raises(CheckpointError, match="another model.*d_model"):
        pretrain(_cfg(tmp_path, corpus, "train.steps=4", "model.d_model=32"), resume=True, show_progress=False)
    with pytest.raises(ConfigError, match="objective 'mlm'"):
        pretrain(_cfg(tmp_path / "x", corpus, "train.objective=mlm"), show_progress=False)
    assert ckpt.read_bytes() == before


# --- processes: SIGKILL during a checkpoint write, SIGTERM, the CLI -------------------------------------
def _spawn(out, corpus, *extra, env_extra=None):
    path, tok = corpus
    env = dict(os.environ, LMLAB_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "lmlab", "pretrain", "--config", "tiny", "--out", str(out), "--files", str(path),
           "--field", "dialogue", "--tokenizer", str(tok), "--device", "cpu", "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, corpus):
    # the hook sleeps between writing the temporary file and the rename: kill -9 the second write there
    proc = _spawn(tmp_path, corpus, "--steps", "1000", "--set", "train.ckpt_every=2", "--set", "train.eval_every=0",
                  env_extra={"LMLAB_TEST_CHECKPOINT_SLEEP": "2"})
    try:
        assert _wait_for(lambda: (tmp_path / "checkpoint.pt").exists()), proc.communicate(timeout=5)
        assert _wait_for(lambda: list(tmp_path.glob(".checkpoint.pt.*.tmp")))  # the step-4 write is in flight
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["loop"]["step"] == 2
    s = pretrain(_cfg(tmp_path, corpus, "train.steps=4", "train.ckpt_every=2"), resume=True, show_progress=False)
    assert s["step"] == 4 and s["finished"]


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus):
    proc = _spawn(tmp_path, corpus, "--steps", "100000", "--set", "train.ckpt_every=0", "--set", "train.eval_every=0")
    try:
        assert _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and
                         len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    step = load_checkpoint(tmp_path / "checkpoint.pt")["loop"]["step"]
    assert step >= 3
    s = pretrain(_cfg(tmp_path, corpus, f"train.steps={step + 1}"), resume=True, show_progress=False)
    assert s["step"] == step + 1


def test_cli_errors_exit_2_with_one_line(tmp_path, corpus):
    path, tok = corpus
    env = dict(os.environ, LMLAB_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lmlab", "pretrain", "--config", "tiny", "--out", str(tmp_path),
                        "--files", str(tmp_path / "nope.txt")], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "nope.txt" in r.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_tokenizer_cli(tmp_path, corpus):
    path, _ = corpus
    env = dict(os.environ, LMLAB_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lmlab", "tokenizer", "train", "--kind", "unigram", "--vocab-size", "100",
                        "--files", str(path), "--field", "dialogue", "--out", str(tmp_path / "t"), "--sentinels", "3"],
                       env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    from lmlab.tokenizer_train import special_token_ids

    ids = special_token_ids(tmp_path / "t")
    assert ids["eos"] == 2 and len(ids["sentinels"]) == 3


def test_every_preset_loads_from_its_one_yaml_file():
    import yaml

    from lmlab.training import TRAIN_PRESETS

    preset_dir = REPO / "src" / "lmlab" / "training" / "presets"
    names = sorted(p.stem for p in preset_dir.glob("*.yaml"))
    assert names == sorted(TRAIN_PRESETS) and {"tiny", "decoder-10m", "encoder-decoder-10m"} <= set(names)
    from lmlab.commands.pretrain import _preset_names

    assert _preset_names().split(", ") == names  # `lmlab pretrain --help` lists them from the same files
    for name in names:
        cfg = load_config(name)  # validates every section and the model preset
        assert TRAIN_PRESETS[name] == yaml.safe_load((preset_dir / f"{name}.yaml").read_text()), name
        assert cfg.model.preset == TRAIN_PRESETS[name]["model"]["preset"] and cfg.out_dir == f"runs/{name}"
        assert not (REPO / "configs" / f"{name}.yaml").exists(), f"configs/{name}.yaml duplicates the preset"
    demo = load_config(REPO / "configs" / "dialogsum-decoder-10m.yaml")  # a user recipe on top of a preset
    assert demo.model.preset == "decoder-10m" and demo.data.field == "dialogue" and demo.train.steps == 300
    assert demo.data.vocab_size == 4096 and demo.train.beta2 == TRAIN_PRESETS["decoder-10m"]["train"].get("beta2", 0.95)


def test_overrides_parse_values_as_yaml():
    cfg = load_config("tiny", ["train.lr=3e-4", "data.files=[a.txt, b.jsonl]", "train.stop_after=null",
                               "model.dropout=0.1"])
    assert cfg.train.lr == 3e-4 and cfg.data.files == ["a.txt", "b.jsonl"] and cfg.model.overrides["dropout"] == 0.1
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["lr"])


def test_span_objective_adds_missing_sentinels_to_tokenizer_and_model(tmp_path, corpus):
    path, _ = corpus
    plain = tmp_path / "plain_tok"
    train_tokenizer(iter_documents([path], "dialogue"), vocab_size=300, out_dir=plain, show_progress=False)
    from lmlab.tokenizer_train import special_token_ids

    assert special_token_ids(plain)["sentinels"] == []
    out = tmp_path / "run"
    pretrain(_cfg(out, (path, plain), "model.preset=tiny-encoder-decoder", "train.steps=2", "data.n_sentinels=8"),
             show_progress=False)
    ids = special_token_ids(out / "tokenizer")
    config = json.loads((out / "config.json").read_text())
    base = Tokenizer.from_file(str(plain / "tokenizer.json")).get_vocab_size()
    assert config["vocab_size"] == base + 8 and ids["sentinels"] == list(range(base + 7, base - 1, -1))


def test_precision_choices(tmp_path, corpus, monkeypatch):
    from lmlab.training.loop import autocast_dtype

    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    real, seen = CausalLM.loss, []

    def recording(self, model, batch):  # the autocast state each training/eval loss runs under
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(self, model, batch)

    monkeypatch.setattr(CausalLM, "loss", recording)
    s = pretrain(_cfg(tmp_path, corpus, "train.steps=2", "train.precision=bf16"), show_progress=False)
    assert s["finished"] and math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])
    assert seen and set(seen) == {torch.bfloat16}  # bf16 autocast on request, for every loss
    with pytest.raises(ConfigError, match="precision='fp16'"):
        pretrain(_cfg(tmp_path / "x", corpus, "train.precision=fp16"), show_progress=False)
