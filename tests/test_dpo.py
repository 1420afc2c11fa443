"""DPO: the loss against hand-computed values, the reference (adapters off) against direct forward passes,
the starting adapter folded in and stacked on save, the job in the one loop (resume, beta change), bad input,
and `lmlab align` end to end on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.adapt.lora import LoraConfig, apply_lora, lora_modules
from lmlab.adapt.peft import save_adapter
from lmlab.adapt.recipe import Recipe
from lmlab.align.prefs import PreferencePair, append_preference
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.model import Transformer
from lmlab.objectives.base import IGNORE_INDEX
from lmlab.objectives.dpo import DirectPreference, dpo_loss, sequence_logprobs
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.training.align import align, fold_adapter, load_align_config
from lmlab.training.loop import _counted

# Tolerances. The values below are float32 sums of at most ~40 log-probabilities of magnitude <= ~10.
# Two fp32 computations of the same quantity by different operation orders (the head on selected rows vs
# all rows, a merged weight vs base + low-rank update) differ per logit by a few ulp of the dot products'
# partial sums: about 1e-6 relative for d_model 64. Summed over <= 40 tokens that is <= ~4e-5 absolute;
# 2e-4 leaves headroom for a bf16-capable CPU's different kernels (still fp32 here).
SUM_ATOL = 2e-4


# --- the loss -----------------------------------------------------------------------------------
def test_dpo_loss_matches_values_computed_by_hand():
    policy_c, policy_r = torch.tensor([-3.0, -1.0, -5.0]), torch.tensor([-2.0, -4.0, -5.0])
    ref_c, ref_r = torch.tensor([-2.5, -2.0, -5.0]), torch.tensor([-2.0, -3.0, -5.0])
    s = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    # log-ratios: chosen (-0.5, 1.0, 0), rejected (0, -1.0, 0); β·margin = (-0.25, 1.0, 0)
    # loss = log(1 + exp(-β·margin)) = (log(1 + e^0.25), log(1 + e^-1), log 2)
    want = torch.tensor([math.log(1 + math.exp(0.25)), math.log(1 + math.exp(-1.0)), math.log(2.0)])
    assert torch.allclose(s.loss, want, atol=1e-6)
    assert torch.equal(s.chosen_logratio, torch.tensor([-0.5, 1.0, 0.0]))
    assert torch.equal(s.rejected_logratio, torch.tensor([0.0, -1.0, 0.0]))
    assert torch.allclose(s.reward_margin, torch.tensor([-0.25, 1.0, 0.0]))
    assert s.correct.tolist() == [0.0, 1.0, 0.0]  # a tie is not a correct ranking
    sums = s.sums()
    assert sums["reward_accuracy"] == 1.0 and abs(sums["dpo_loss"] - float(want.sum())) < 1e-5


def test_dpo_loss_gradient_and_a_hopeless_margin_stay_finite():
    c = torch.tensor([-500.0], requires_grad=True)
    s = dpo_loss(c, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    s.loss.sum().backward()
    assert torch.isfinite(s.loss).all() and abs(float(s.loss.detach()) - 500.0) < 1e-3
    assert abs(float(c.grad) + 1.0) < 1e-6  # d/dc of -logsigmoid(c) at c = -500 is -σ(500) = -1


def test_sequence_logprobs_sum_each_rows_labelled_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])  # (N=3, V=3)
    labels, rows = torch.tensor([2, 0, 1]), torch.tensor([0, 0, 1])
    got = sequence_logprobs(logits, labels, rows, n_rows=3)
    lse0 = math.log(1 + math.e + math.e**2)
    want = [(2.0 - lse0) + math.log(1 / 3), 0.0 - math.log(math.exp(3) + 2), 0.0]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_collate_puts_chosen_then_rejected_and_counts_pairs():
    dpo = DirectPreference("decoder", pad_token_id=0, beta=0.1)
    batch = dpo.collate([([5, 6], [7, 1], [8, 9, 1]), ([5], [7, 7, 1], [9, 1])])
    assert batch["input_ids"].shape[0] == 4
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 7, 1, IGNORE_INDEX]  # prompt 5 6, chosen 7 <eos>
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, 8, 9, 1]  # the first pair's rejected, after both chosen
    assert dpo.count(batch) == 2 and _counted(dpo, batch) == 2  # the loop weights DPO micro-batches by pairs
    sft = SupervisedFineTuning("decoder", 0)
    assert _counted(sft, batch) == int((batch["labels"] != IGNORE_INDEX).sum())  # and SFT's by tokens


def test_more_ranks_than_pairs_count_each_pair_once():
    from lmlab.training.align import PairBatches, TokenizedPair
    from lmlab.training.distributed import DistEnv

    pairs = [TokenizedPair(f"f:{i}", f"p{i}", [5, 6, 10 + i], [8, 1], [9, 9, 1], False) for i in range(3)]
    dpo = DirectPreference("decoder", pad_token_id=0, beta=0.1)
    world = 4
    ranks = [PairBatches(pairs, dpo, batch_size=2, seed=0, env=DistEnv(rank=r, world_size=world)) for r in range(world)]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=32)).eval()
    for step in range(ranks[0].batches_per_epoch):
        batch = ranks[0]._batches[ranks[0].position]
        micro = [r.next_micro_batches(step, 1)[0] for r in ranks]
        assert [dpo.count(m) for m in micro] == [1] * len(batch) + [0] * (world - len(batch))
        seen = [m["input_ids"][0, 2].item() for m, n in zip(micro, map(dpo.count, micro)) if n]
        assert sorted(seen) == sorted(p.prompt[2] for p in batch)  # every pair of the batch, each on one rank
        # a rank with nothing of its own runs a filler: zero loss and count, absent from the training metrics
        filler = micro[-1]
        loss, n = dpo.loss(model, filler)
        assert int(n) == 0 and loss.item() == 0.0 and loss.requires_grad
        assert dpo.train_metrics() == {}
    loss, n = dpo.loss(model, micro[0])  # a real pair still counts
    assert int(n) == 1 and set(dpo.train_metrics()) >= {"dpo_loss", "reward_accuracy"}


def test_bad_beta_is_one_clear_error():
    with pytest.raises(ConfigError, match="beta=0"):
        DirectPreference("decoder", 0, beta=0)


# --- the reference is the model with its adapters off ------------------------------------------------
def _tiny_lora_model(seed: int = 0):
    torch.manual_seed(seed)
    base = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=40)).eval()
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "down")))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.5)  # a trained adapter: the policy differs from the reference
    return base, model


def _direct_logprobs(model, batch) -> torch.Tensor:
    """Row sums of log p(label) from the full logits of a plain forward pass (no head-on-selected-rows)."""
    with torch.no_grad():
        logp = F.log_softmax(model(batch["input_ids"]).float(), dim=-1)  # (B, T, V)
    out = []
    for b in range(batch["labels"].shape[0]):
        total = 0.0
        for t, label in enumerate(batch["labels"][b].tolist()):
            if label != IGNORE_INDEX:
                total += float(logp[b, t, label])
        out.append(total)
    return torch.tensor(out)


def test_reference_logprobs_equal_a_direct_forward_pass_of_the_base_model():
    base, model = _tiny_lora_model()
    dpo = DirectPreference("decoder", pad_token_id=0, beta=0.1)
    g = torch.Generator().manual_seed(1)
    triples = [(torch.randint(2, 40, (n,), generator=g).tolist(), torch.randint(2, 40, (c,), generator=g).tolist(),
                torch.randint(2, 40, (r,), generator=g).tolist()) for n, c, r in [(7, 5, 9), (12, 3, 4)]]
    batch = dpo.collate(triples)
    model.train()
    with torch.no_grad():
        reference = dpo.reference_logprobs(model, batch)
        policy = dpo.logprobs(model, batch)
    assert model.training  # the reference pass put the model back in training mode
    assert all(m.enabled for _, m in lora_modules(model))  # and its adapters back on
    assert torch.allclose(reference, _direct_logprobs(base, batch), atol=SUM_ATOL)
    assert torch.allclose(policy, _direct_logprobs(model.eval(), batch), atol=SUM_ATOL)
    assert (policy - reference).abs().max() > 100 * SUM_ATOL  # the adapters matter: the test can tell them apart


def test_a_fresh_adapter_starts_at_the_reference_loss_log2_and_learns():
    base, model = _tiny_lora_model()
    for _, m in lora_modules(model):
        torch.nn.init.zeros_(m.lora_B.weight)  # a fresh adapter: the policy is the reference
        m.lora_B.weight.requires_grad_(True)
    dpo = DirectPreference("decoder", pad_token_id=0, beta=0.5)
    batch = dpo.collate([([3, 4, 5], [6, 7, 1], [8, 9, 1])])
    loss, n = dpo.loss(model.train(), batch)
    assert abs(float(loss.detach()) - math.log(2)) < 1e-6 and int(n) == 1
    loss.backward()
    assert any(m.lora_B.weight.grad.abs().max() > 0 for _, m in lora_modules(model))
    metrics = dpo.train_metrics()
    assert metrics["reward_accuracy"] == 0.0 and abs(metrics["chosen_logratio"]) < 1e-6
    assert dpo.train_metrics() == {}  # read and reset


def test_folded_starting_adapter_is_the_reference_and_the_saved_stack_is_the_policy(tiny_model_dir, tmp_path):
    from lmlab.adapt.lora import lora_disabled
    from lmlab.training.align import save_policy

    sft_dir = _starting_adapter(tiny_model_dir, tmp_path / "sft")
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        started = lmlab.load_model(tiny_model_dir, adapter=sft_dir)(ids)  # base + SFT adapter, unmerged
        model = lmlab.load_model(tiny_model_dir)
        first = fold_adapter(model, sft_dir)
        lora = LoraConfig(r=2, alpha=4, dropout=0.0)
        apply_lora(model, lora)
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.3)  # as if DPO had trained it
        with lora_disabled(model):
            reference = model(ids)
        policy = model(ids)
    assert (reference - started).abs().max() < 1e-4  # adapters off = the starting policy (merge vs unmerged: fp32 rounding)
    assert (policy - reference).abs().max() > 1e-2
    # saved as one adapter for the base model: SFT (r 4) and DPO (r 2) stacked, rank 6
    save_policy(model, tmp_path / "out", str(tiny_model_dir), lora, first, Recipe.load(sft_dir))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 6
    assert Recipe.load(tmp_path / "out") == Recipe.load(sft_dir)
    with torch.no_grad():
        reloaded = lmlab.load_model(tiny_model_dir, adapter=tmp_path / "out")(ids)
    assert (reloaded - policy).abs().max() < 1e-4
    assert all(m.r == 2 and m.lora_A.weight.shape[0] == 2 for _, m in lora_modules(model))  # the stack was undone


def _starting_adapter(model_dir: Path, out: Path) -> Path:
    """A 'fine-tuned' adapter on the tiny model: random A and B, saved in PEFT format with a recipe."""
    torch.manual_seed(3)
    model = lmlab.load_model(model_dir)
    config = LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    apply_lora(model, config)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.2)
    save_adapter(model, out, config, base_model=str(model_dir))
    Recipe("instruction", "Summarize the dialogue.", False, "dialogue", "summary", 8).save(out)
    return out


# --- the job ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> tuple[Path, Path]:
    """Preference pairs from the bundled dialogues (chosen: the human summary; rejected: the first turn recited)
    and the same dialogues as DialogSum-style records for ROUGE."""
    root = tmp_path_factory.mktemp("prefs")
    records = load_dialogues().records
    path = root / "prefs.jsonl"
    for d in records[:20]:
        append_preference(path, PreferencePair(d.dialogue, d.references[0], d.dialogue.splitlines()[0], "test"))
    labelled = root / "dialogues.jsonl"
    labelled.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                                for d in records))
    return path, labelled


def _config(model_dir, prefs, out, *sets):
    path, labelled = prefs
    return load_align_config(None, [
        f"base_model={model_dir}", f"out_dir={out}", f"data.train={path}", "data.holdout=4", "data.max_seq_len=384",
        f"data.rouge={{path: {labelled}, records: '20:28'}}", "eval.rouge_examples=2", "eval.max_new_tokens=8",
        "train.epochs=null", "train.steps=4", "train.batch_size=2", "train.grad_accum=1", "train.lr=5e-3",
        "train.warmup_steps=1", "train.eval_every=2", "train.ckpt_every=1", "lora.r=4", "lora.dropout=0.1",
        "train.device=cpu", *sets])


def test_dpo_run_learns_logs_its_metrics_and_resumes_exactly(tiny_model_dir, prefs, tmp_path):
    s = align(_config(tiny_model_dir, prefs, tmp_path / "a"), show_progress=False)
    assert s["finished"] and s["step"] == 4 and s["train_pairs"] == 16 and s["heldout_pairs"] == 4
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-5  # step 1: the policy is the reference
    assert train[0]["reward_accuracy"] == 0.0 and train[-1]["reward_accuracy"] > 0.5
    assert all(k in train[-1] for k in ("chosen_logratio", "rejected_logratio", "reward_margin"))
    assert train[-1]["rejected_logratio"] < train[-1]["chosen_logratio"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["val_reward_accuracy"] >= 0.5
    rouge = [r for r in records if r["kind"] == "rouge"]
    assert len(rouge) == 1 and {"rouge1", "empty", "recited", "val_loss"} <= set(rouge[0]) and s["rouge"]["examples"] == 2
    assert {"adapter_config.json", "adapter_model.safetensors", "lmlab_recipe.json"} <= {
        f.name for f in (tmp_path / "a" / "final").iterdir()}

    # interrupted after 1 step (dropout, data order, optimizer all in the checkpoint) and resumed: bit for bit
    first = align(_config(tiny_model_dir, prefs, tmp_path / "b", "train.stop_after=1"), show_progress=False)
    assert not first["finished"] and first["step"] == 1
    align(_config(tiny_model_dir, prefs, tmp_path / "b"), resume=True, show_progress=False)
    from safetensors.torch import load_file

    want = load_file(str(tmp_path / "a" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "b" / "final" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # --resume with another beta: one line naming beta, and the checkpoint untouched
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"beta was 0\.1, now 0\.2"):
        align(_config(tiny_model_dir, prefs, tmp_path / "b", "beta=0.2"), resume=True, show_progress=False)
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before


def test_holdout_keeps_a_prompts_pairs_on_one_side():
    from lmlab.training.align import TokenizedPair, split_holdout

    pairs = [TokenizedPair(f"f:{i}", f"dialogue {i // 3}", [1], [2], [3], False) for i in range(12)]  # 3 per prompt
    train, held = split_holdout(pairs, 4, seed=0)
    assert len(held) == 6 and len(train) == 6  # two whole prompts (3 + 3 >= 4)
    assert not {p.prompt_text for p in train} & {p.prompt_text for p in held}
    with pytest.raises(ConfigError, match="holdout=100"):
        split_holdout(pairs, 100, seed=0)


def test_a_prompt_longer_than_the_context_window_names_the_record(tiny_model_dir, prefs, tmp_path):
    path = tmp_path / "long.jsonl"
    append_preference(path, PreferencePair("#Person1#: Hi.\n#Person2#: Hello.", "They greet.", "Hi."))
    long_dialogue = "\n".join(f"#Person1#: I would like item number {i}, please." for i in range(600))
    append_preference(path, PreferencePair(long_dialogue, "A long order.", "#Person1#: I would like"))
    with pytest.raises(DataError, match=r"long\.jsonl:2: the prompt is \d+ tokens, longer than the model's context "
                                        r"window of 2048 tokens"):
        align(_config(tiny_model_dir, (path, prefs[1]), tmp_path / "out"), show_progress=False)


@pytest.mark.parametrize("sets, error, message", [
    (["beta=-1"], ConfigError, "beta=-1"),
    (["method=ppo"], ConfigError, "method='ppo'"),
    (["adapter=/no/such/adapter"], ConfigError, "/no/such/adapter"),
    (["data.holdout=-2"], ConfigError, "data.holdout=-2"),
    (["train.neftune_alpha=5"], ConfigError, "train.neftune_alpha=5 apply to supervised fine-tuning, not to dpo"),
    (["train.label_smoothing=0.1"], ConfigError, r"train.label_smoothing=0.1 / .* not to dpo"),
])
def test_bad_config_is_one_clear_error(tiny_model_dir, prefs, tmp_path, sets, error, message):
    with pytest.raises(error, match=message):
        align(_config(tiny_model_dir, prefs, tmp_path, *sets), show_progress=False)


def test_cli_align_from_a_starting_adapter_end_to_end(tiny_model_dir, prefs, tmp_path, capsys):
    sft_dir = _starting_adapter(tiny_model_dir, tmp_path / "sft")
    path, labelled = prefs
    out = tmp_path / "dpo"
    argv = ["align", "--method", "dpo", "--base", str(tiny_model_dir), "--adapter", str(sft_dir), "--prefs", str(path),
            "--beta", "0.2", "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--holdout", "2",
            "--rank", "2", "--lr", "1e-3", "--rouge-data", f"{labelled}:20:28", "--rouge-examples", "2",
            "--set", "eval.max_new_tokens=8", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps" in printed and "val_reward_accuracy" in printed and "rouge1" in printed
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == 6  # SFT and DPO stacked, scale 1
    assert Recipe.load(out / "final").instruction == "Summarize the dialogue."  # the starting adapter's prompt
    # the saved adapter holds both updates: on the base it is neither the base nor the starting policy
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        base, start, policy = (lmlab.load_model(tiny_model_dir, adapter=a)(ids) for a in (None, sft_dir, out / "final"))
    # DPO moved the policy away from where it started (2 steps at lr 1e-3 with beta 0.2 move the logits by ~0.1)
    assert (policy - start).abs().max() > 1e-2 and (policy - base).abs().max() > 1e-2
    # a second run into the same directory without --resume is refused; with --resume and another beta too
    assert main(argv) == 2 and "already holds a checkpoint" in capsys.readouterr().err
    assert main([*argv[:-3], "--beta", "0.3", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "beta was 0.2, now 0.3" in capsys.readouterr().err
