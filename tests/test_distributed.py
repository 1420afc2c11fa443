"""DDP and FSDP2 on CPU (gloo, 2 processes via torchrun): same losses as one process, checkpoints, resume.

Each torchrun launch costs a few seconds of start-up, so the runs are tiny and shared by the asserts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.corpus import iter_documents
from lmlab.tokenizer_train import train_tokenizer
from lmlab.training import load_config, pretrain
from lmlab.training.state import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORDS = "one two three four five six seven eight nine ten red green blue cat dog bird tree house".split()
# one process vs two with the same global batch: the same blocks and the same token-mean gradient;
# only the order of floating-point sums differs (all-reduce), so losses agree to ~1e-6 relative
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(1)
    path = root / "docs.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS, size=rng.integers(10, 40))) for _ in range(200)))
    tok = root / "tok"
    train_tokenizer(iter_documents([path]), vocab_size=300, out_dir=tok, show_progress=False)
    return path, tok


def _sets(out, corpus, *extra):
    path, tok = corpus
    # fp32 pinned: LOSS_RTOL and the weight tolerances below are fp32 bounds, and "auto" is bf16 on a CPU
    # with native bf16
    return [f"out_dir={out}", f"data.files=[{path}]", f"data.tokenizer={tok}", "train.steps=4",
            "train.eval_every=2", "train.ckpt_every=0", "train.log_every=1", "train.device=cpu",
            "train.precision=fp32", *extra]


def _torchrun(out, corpus, mode, *extra, resume=False):
    env = dict(os.environ, LMLAB_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmlab", "pretrain", "--config", "tiny", "--no-progress", "--distributed", mode]
    for s in _sets(out, corpus, *extra):
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    # a guard against a hung process group, not a speed check: on a shared, busy CPU a tiny run can take minutes
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out, kind="train"):
    key = "loss" if kind == "train" else "val_loss"
    return [r[key] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("single")
    pretrain(load_config("tiny", _sets(out, corpus)), show_progress=False)
    return out


def test_ddp_matches_one_process_and_resumes(tmp_path, corpus, single):
    out = tmp_path / "ddp"
    r = _torchrun(out, corpus, "ddp", "train.stop_after=2")  # 2 steps, checkpoint ...
    assert r.stdout.count("stopped at step 2") == 1  # rank 0 reports, rank 1 stays quiet
    _torchrun(out, corpus, "ddp", resume=True)  # ... then resume to 4
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(single)), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(_losses(out, "eval")), torch.tensor(_losses(single, "eval")),
                               rtol=LOSS_RTOL, atol=0)
    a, b = load_checkpoint(out / "checkpoint.pt")["model"], load_checkpoint(single / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_ddp_with_dropout_resumes_exactly_with_each_ranks_own_random_stream(tmp_path, corpus):
    # dropout > 0: the masks come from each rank's torch RNG, so an exact resume needs every rank's state back
    sets = ("model.dropout=0.1", "train.eval_every=0")
    _torchrun(tmp_path / "straight", corpus, "ddp", *sets)
    _torchrun(tmp_path / "resumed", corpus, "ddp", *sets, "train.stop_after=2")
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert saved["loop"]["step"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # the ranks' streams differ
    _torchrun(tmp_path / "resumed", corpus, "ddp", *sets, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["loop"]["step"] == b["loop"]["step"] == 4
    for k in a["model"]:  # the same ops in the same order on the same data: bit-identical, no tolerance
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")  # the log holds each step once


def test_fsdp_trains_and_its_checkpoint_round_trips(tmp_path, corpus, single):
    out = tmp_path / "fsdp"
    _torchrun(out, corpus, "fsdp", "train.stop_after=2")
    state = load_checkpoint(out / "checkpoint.pt")
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer

    plain = Transformer(ModelConfig.from_dict(state["identity"]["model_config"]))
    plain.load_state_dict(state["model"])  # a full (unsharded) state dict: loads into a plain model, strict
    assert state["loop"]["step"] == 2 and len(state["optimizer"]["state"]) > 0
    _torchrun(out, corpus, "fsdp", resume=True)  # loads the full state back into the sharded model
    # the resumed sharded run follows the one-process trajectory: the round trip lost nothing
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(single)), rtol=LOSS_RTOL, atol=0)
    a, b = load_checkpoint(out / "checkpoint.pt")["model"], load_checkpoint(single / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert (out / "model.safetensors").exists()


def test_fsdp_sharded_dcp_checkpoint_resumes(tmp_path, corpus, single):
    out = tmp_path / "dcp"
    _torchrun(out, corpus, "fsdp", "train.stop_after=2", "train.sharded_checkpoint=true")
    state = load_checkpoint(out / "checkpoint.pt")
    assert "model" not in state and (out / "checkpoint_dcp" / state["sharded"] / ".metadata").exists()
    _torchrun(out, corpus, "fsdp", "train.sharded_checkpoint=true", resume=True)
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(single)), rtol=LOSS_RTOL, atol=0)


def _relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all the weights of two state dicts."""
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a])
    return (diff.norm() / torch.cat([a[k].float().flatten() for k in a]).norm()).item()


def test_ddp_in_bf16_stays_within_bf16_rounding_of_one_process(tmp_path, corpus):
    """The bf16 autocast path under DDP, with bounds reasoned for bf16 (the fp32 tests above use fp32 ones).

    Each rank runs half the batch, so its matmuls see other shapes than one process's: an fp32 sum taken in
    another order can land on the other side of a bf16 rounding boundary, and that activation then differs
    by one bf16 step (2**-8 relative). Such flips are rare and AdamW moves each weight by at most ~lr a step
    whatever its gradient, so the weights after 4 steps must agree within one bf16 step in norm, and each
    step's loss within one bf16 step too (measured: 4e-4 and 1e-5). A DDP that did not average the gradients
    would leave rank 0 with the model trained on its half of every batch, ~4e-2 away (the weight bound is
    the discriminating one; test_training's bf16 accumulation test measures that distance).
    """
    sets = ("train.precision=bf16", "train.eval_every=0")
    single = tmp_path / "single"
    pretrain(load_config("tiny", _sets(single, corpus, *sets)), show_progress=False)
    _torchrun(tmp_path / "ddp", corpus, "ddp", *sets)
    a = load_checkpoint(single / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    assert _relative_distance(a, b) < 2 ** -8
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "ddp")), torch.tensor(_losses(single)),
                               rtol=2 ** -8, atol=0)
