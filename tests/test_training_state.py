"""Training state: checkpoints without pickle, RNG states, metrics after a crash, MFU, reproducible runs."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.corpus import iter_documents
from lmlab.errors import CheckpointError, DataError
from lmlab.tokenizer_train import train_tokenizer
from lmlab.training import load_config, pretrain
from lmlab.training import loop as training_loop
from lmlab.training.state import (CHECKPOINT_FORMAT, derived_seed, load_checkpoint, restore_rank_rng_state,
                                       rng_state, set_rng_state)
from lmlab.training.metrics import MetricsLog, best_rate, model_flops_utilization

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while dogs ran in the park and birds sang songs about summer rain "
         "person one asked person two where the train station was and they walked there together").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small JSONL corpus and a BPE tokenizer with sentinels (every objective can use it)."""
    root = tmp_path_factory.mktemp("state")
    rng = np.random.default_rng(3)
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"dialogue": " ".join(rng.choice(WORDS, size=rng.integers(10, 40)))}) + "\n"
                            for _ in range(300)))
    tok = root / "tok"
    train_tokenizer(iter_documents([path], "dialogue"), vocab_size=320, n_sentinels=16, out_dir=tok, show_progress=False)
    return path, tok


def _cfg(out, corpus, *sets, tokenizer=True):
    path, tok = corpus
    given = [f"data.tokenizer={tok}"] if tokenizer else []
    return load_config("tiny", [f"out_dir={out}", f"data.files=[{path}]", "data.field=dialogue", "train.device=cpu",
                                *given, *sets])


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()


# --- 1. no pickle on resume ---------------------------------------------------------------------
def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    random.gauss(0, 1)  # leaves a cached second gaussian in python's state
    np.random.randn()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no python objects needed
    assert _draws() == expected


def test_a_checkpoint_loads_with_weights_only(tmp_path, corpus):
    pretrain(_cfg(tmp_path, corpus, "model.dropout=0.1", "train.steps=2"), show_progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["loop"]["step"] == 2
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["numpy"]["key"], torch.Tensor)


class _Payload:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_old_pickled_checkpoint_is_refused_without_running_it(tmp_path, corpus):
    marker = tmp_path / "payload-ran"
    out = tmp_path / "run"
    out.mkdir()
    # what lmlab wrote before format 3 (python/numpy RNG tuples), plus a payload someone slipped in
    old = {"format": 1, "step": 2, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                           "torch": torch.get_rng_state()}, "extra": _Payload(marker)}
    torch.save(old, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"pickled python objects \(.*system.*\).*Start the run again"):
        load_checkpoint(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="new out_dir"):
        pretrain(_cfg(out, corpus), resume=True, show_progress=False)
    assert not marker.exists()


def test_a_sharded_checkpoint_index_is_read_without_running_code(tmp_path):
    import pickle

    from lmlab.training import distributed as dist

    torch.manual_seed(0)
    model, fresh = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    dist.save_sharded(model, optimizer, tmp_path / "dcp")  # one process: DCP runs without a process group
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    dist.load_sharded(fresh, fresh_optimizer, tmp_path / "dcp")  # through the restricted index reader
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    marker = tmp_path / "payload-ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"names posix\.system.*refusing"):
        dist.load_sharded(fresh, fresh_optimizer, tmp_path / "dcp")
    assert not marker.exists()


def test_no_unrestricted_unpickling_or_eval_of_file_contents_in_src():
    pattern = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|(?<![.\w])eval\(|pickle\.Unpickler\(")
    hits, unpicklers = [], []
    for path in sorted((REPO / "src").rglob("*.py")):
        text = path.read_text()
        hits += [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
        unpicklers += [(path.name, m.group(1), text) for m in re.finditer(r"class (\w+)\(pickle\.Unpickler\)", text)]
    assert hits == []
    # the one unpickler (DCP's index) restricts the classes it may build
    assert [(name, cls) for name, cls, _ in unpicklers] == [("distributed.py", "_DCPMetadataUnpickler")]
    assert "def find_class" in unpicklers[0][2]


# --- 2. per-rank random streams ----------------------------------------------------------------
def test_each_rank_gets_its_own_state_back(tmp_path):
    states = []
    for rank in range(3):
        torch.manual_seed(derived_seed(11, rank))
        states.append(rng_state())
    for rank in range(3):
        torch.manual_seed(0)
        assert restore_rank_rng_state(states, rank, 3, seed=11, step=5)
        torch.manual_seed(derived_seed(11, rank))
        expected = torch.rand(4)
        restore_rank_rng_state(states, rank, 3, seed=11, step=5)
        assert torch.equal(torch.rand(4), expected)
    assert len({derived_seed(11, rank) for rank in range(3)}) == 3
    # another world size: no exact state for every rank, a fresh reproducible stream instead
    assert not restore_rank_rng_state(states, 1, 2, seed=11, step=5)
    after = torch.rand(4)
    restore_rank_rng_state(states, 1, 2, seed=11, step=5)
    assert torch.equal(torch.rand(4), after)


# --- 3. metrics.jsonl after a kill -----------------------------------------------------------------
def test_metrics_log_skips_a_torn_last_line_and_truncates_atomically(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", fresh=True)
    for step in range(1, 6):
        log.write(kind="train", step=step, loss=1.0 / step)
    log.write(kind="eval", step=4, val_loss=0.5)
    with log.path.open("a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5, 4]
    assert log.truncate(4) == 1  # step 5 dropped (and the torn line)
    assert [(r["kind"], r["step"]) for r in log.read()] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                            ("eval", 4)]
    assert log.path.read_text().endswith("}\n") and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    log.path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damage in the middle is not a torn write
    with pytest.raises(DataError, match="line 2 is not JSON"):
        log.read()


def test_resume_after_a_kill_logs_every_step_once(tmp_path, corpus):
    sets = ("train.steps=6", "train.eval_every=0", "train.ckpt_every=0")
    pretrain(_cfg(tmp_path, corpus, *sets, "train.stop_after=4"), show_progress=False)
    at_step_4 = tmp_path / "checkpoint-step4.pt"
    shutil.copyfile(tmp_path / "checkpoint.pt", at_step_4)
    pretrain(_cfg(tmp_path, corpus, *sets, "train.stop_after=2"), resume=True, show_progress=False)
    # now make it look like SIGKILL after step 6 was logged but before its checkpoint, mid-write of a record
    shutil.copyfile(at_step_4, tmp_path / "checkpoint.pt")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 7, "loss": 1.')
    s = pretrain(_cfg(tmp_path, corpus, *sets), resume=True, show_progress=False)
    assert s["finished"] and s["step"] == 6
    steps = [r["step"] for r in MetricsLog(tmp_path / "metrics.jsonl", fresh=False).read() if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- 4. MFU ----------------------------------------------------------------------------------------
def test_peak_is_the_best_of_several_runs():
    # a scripted clock: the first run takes 10 s per call (a busy machine), the others 1 s
    ticks = iter([0.0, 10.0, 10.0, 11.0, 11.0, 12.0, 12.0, 13.0])
    assert best_rate(lambda: None, flops_per_call=100.0, repeats=4, seconds=0.5, clock=lambda: next(ticks)) == 100.0


def test_peak_covers_the_training_shapes_and_takes_the_best(monkeypatch):
    from lmlab.config import ModelConfig
    from lmlab.training import metrics

    shapes = metrics.training_matmul_shapes(ModelConfig.from_name("gpt2-124m"), tokens=12 * 1024)
    assert shapes == [(2048, 768, 2048), (2048, 2048, 768), (2048, 768, 2048)]  # capped: cheap to time
    timed = []

    def fake_best_rate(run, flops_per_call, repeats, seconds, sync):  # pretend rate = FLOPs of one call
        timed.append(flops_per_call)
        return flops_per_call

    monkeypatch.setattr(metrics, "best_rate", fake_best_rate)
    monkeypatch.setattr(metrics, "_PEAK_CACHE", {})
    small = [(8, 16, 32), (64, 32, 16)]
    peak = metrics.measure_peak_flops(torch.device("cpu"), torch.float32, small, repeats=2, seconds=0.01)
    assert timed == [2 * 1024**3, 2 * 8 * 16 * 32, 2 * 64 * 32 * 16] and peak == 2 * 1024**3  # square + each shape


def test_mfu_is_never_above_one_even_when_the_peak_reads_low(tmp_path, corpus, monkeypatch):
    assert model_flops_utilization(1000, 10.0, peak_flops=1e9) == pytest.approx(6e4 / 1e9)
    assert model_flops_utilization(1000, 10.0, peak_flops=1.0) == 1.0
    monkeypatch.setattr(training_loop, "measure_peak_flops", lambda *a, **k: 1.0)  # 1 FLOP/s: far too low
    s = pretrain(_cfg(tmp_path, corpus, "train.steps=3", "train.eval_every=0"), show_progress=False)
    mfus = [r["mfu"] for r in MetricsLog(tmp_path / "metrics.jsonl", fresh=False).read() if r["kind"] == "train"]
    assert len(mfus) == 3 and max(mfus) == s["mfu"] == 1.0


# --- 5. reproducibility -------------------------------------------------------------------------------
def test_unigram_tokenizer_training_is_byte_identical_across_processes(tmp_path, corpus):
    path, _ = corpus
    outputs = []
    for run in ("a", "b"):  # separate processes: a per-process random hash order must not matter
        out = tmp_path / run
        r = subprocess.run([sys.executable, "-m", "lmlab", "tokenizer", "train", "--kind", "unigram",
                            "--vocab-size", "150", "--sentinels", "4", "--files", str(path), "--field", "dialogue",
                            "--out", str(out)], env=dict(os.environ, LMLAB_NUM_THREADS="1"),
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        outputs.append(((out / "tokenizer.json").read_bytes(), (out / "tokenizer_config.json").read_bytes()))
    assert outputs[0] == outputs[1]
    vocab = json.loads(outputs[0][0])["model"]["vocab"]
    assert [p for p, _ in vocab[:5]] == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"] and len(vocab) > 50


def test_span_corruption_runs_with_the_same_seed_give_identical_weights(tmp_path, corpus):
    # the whole job: a Unigram tokenizer trained on the data, span masks, model init and dropout
    sets = ("model.preset=tiny-encoder-decoder", "model.dropout=0.1", "data.tokenizer_kind=unigram",
            "data.vocab_size=200", "train.steps=3", "train.eval_every=0", "train.seed=7")
    for run in ("a", "b"):
        pretrain(_cfg(tmp_path / run, corpus, *sets, tokenizer=False), show_progress=False)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    a, b = load_checkpoint(tmp_path / "a/checkpoint.pt")["model"], load_checkpoint(tmp_path / "b/checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = pretrain(_cfg(tmp_path / "c", corpus, *sets[:-1], "train.seed=8", tokenizer=False), show_progress=False)
    assert c["finished"]
    other = load_checkpoint(tmp_path / "c/checkpoint.pt")["model"]
    assert not all(torch.equal(a[k], other[k]) for k in a)  # the seed does reach the weights
