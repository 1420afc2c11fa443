"""The reward model: Bradley–Terry loss, pooling per architecture, training in the loop, save/load, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.align.prefs import PreferencePair, append_preference
from lmlab.align.reward import (RewardConfig, RewardModel, RewardScorer, RewardSettings, check_same_tokenizer,
                                encode_example, load_reward, tokenizer_fingerprint, train_reward)
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.model import Transformer
from lmlab.objectives.reward import PairwiseReward, bradley_terry_loss, pad_rows


def test_bradley_terry_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([1.0, -0.5, 3.0]), torch.tensor([0.0, 0.5, -40.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -1, 43
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)) + math.log1p(math.exp(-43.0))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # a huge wrong-way margin stays finite (logsigmoid, not log(sigmoid))
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item() == pytest.approx(400.0)


def _tiny(arch: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(f"tiny-{arch}", pad_token_id=0)).eval()


def test_decoder_pools_the_final_real_token_and_padding_does_not_change_a_score():
    model = RewardModel(_tiny("decoder")).eval()
    assert model.pooling == "last"
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = pad_rows(rows, 0)  # (2, 6): the second row right-padded
    with torch.no_grad():
        batched = model(ids, mask)
        for b, row in enumerate(rows):
            hidden = model.backbone(torch.tensor([row]), return_hidden=True)  # (1, T, C)
            direct = model.head(hidden[0, -1]).item()
            # fp32 sums over C=64 features of O(1) values: rounding differences stay far below 1e-4
            assert batched[b].item() == pytest.approx(direct, abs=1e-4)
        # the final token decides: changing an earlier token changes the score, appending one changes it too
        assert model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).item() != pytest.approx(
            model(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)).item(), abs=1e-6)


def test_encoder_mean_pools_real_tokens_only():
    model = RewardModel(_tiny("encoder")).eval()
    assert model.pooling == "mean"
    rows = [[5, 6, 7, 8, 9], [11, 12]]
    ids, mask = pad_rows(rows, 0)
    with torch.no_grad():
        batched = model(ids, mask)
        for b, row in enumerate(rows):
            hidden = model.backbone.encode(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
            direct = model.head(hidden[0].mean(0)).item()
            assert batched[b].item() == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_response_mean_pools_the_response_positions_only(arch):
    from lmlab.objectives.reward import response_mask

    model = RewardModel(_tiny(arch), pooling="response_mean").eval()
    rows, lengths = [[5, 6, 7, 8, 9], [11, 12, 13]], [2, 3]  # the last 2 (3) ids of each row are its response
    ids, mask = pad_rows(rows, 0)
    pool = response_mask(rows, lengths)
    assert pool.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 0, 0]]
    with torch.no_grad():
        batched = model(ids, mask, pool)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            one = torch.tensor([row])
            hidden = (model.backbone(one, return_hidden=True) if arch == "decoder"
                      else model.backbone.encode(one, torch.ones(1, len(row), dtype=torch.long)))
            direct = model.head(hidden[0, -n:].mean(0)).item()
            assert batched[b].item() == pytest.approx(direct, abs=1e-4)
    with pytest.raises(ValueError, match="pool_mask"):
        model(ids, mask)
    with pytest.raises(ConfigError, match="choose one of"):
        RewardModel(_tiny(arch), pooling="max")


def test_the_summary_is_never_cut_only_the_dialogue(tiny_model_dir):
    """A dialogue far longer than max_len: the row fits, ends with the whole summary and the end token, and the
    dialogue is what was cut (around the [...] marker)."""
    import lmlab
    from lmlab.align.reward import default_recipe, encode_parts, end_token

    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    config = RewardConfig(base="x", arch="decoder", pooling="last", **default_recipe("decoder", tokenizer), max_len=160,
                          tokenizer="")
    dialogue = "\n".join(f"#Person{1 + i % 2}#: this is turn number {i} of a long talk" for i in range(200))
    summary = "#Person1# and #Person2# talk for a long time about many turns."
    row, n = encode_parts(dialogue, summary, tokenizer, config)
    body = tokenizer.encode(" " + summary)
    assert len(row) <= 160 and n == len(body) + 1
    assert row[-n:] == body + [end_token(tokenizer, "decoder")]
    assert "[...]" in tokenizer.decode(row[:-n]) and "turn number 0 " in tokenizer.decode(row[:-n])


def test_objective_collates_chosen_rows_first_and_counts_pairs():
    objective = PairwiseReward(pad_token_id=0)
    batch = objective.collate([([1, 2, 3], [1, 2]), ([4], [5, 6, 7, 8])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [1, 2, 0, 0], [5, 6, 7, 8]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert objective.count(batch) == 2
    model = RewardModel(_tiny("decoder"))
    loss, n = objective.loss(model, batch)
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["attention_mask"])
    assert int(n) == 2 and loss.item() == pytest.approx(bradley_terry_loss(scores[:2], scores[2:]).item(), abs=1e-6)
    assert set(objective.train_metrics()) == {"reward_accuracy", "reward_margin"}


# --- training, saving, scoring -----------------------------------------------------------------------
GOOD = ["#Person1# asks #Person2# about the trip.", "#Person2# helps #Person1# find the station.",
        "#Person1# and #Person2# plan a dinner.", "#Person2# tells #Person1# about a new job."]
BAD = ["#Person1#: hello how are you", "the conversation is a humorous example of talking",
       "#Person2#: I am fine thanks and you", "this dialogue shows how people talk"]


def _pairs(path, n, offset=0):
    for i in range(n):
        append_preference(path, PreferencePair(f"#Person1#: dialogue {i + offset}\n#Person2#: reply {i}",
                                               GOOD[(i + offset) % 4], BAD[(i + 2 * offset) % 4], f"t{i}"))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    train, held = _pairs(tmp / "train.jsonl", 16), _pairs(tmp / "held.jsonl", 8, offset=1)
    settings = RewardSettings(base=str(tiny_model_dir), prefs=str(train), eval_prefs=str(held), out=str(tmp / "run"),
                              epochs=6, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=8, ckpt_every=8,
                              max_len=160)
    summary = train_reward(settings, show_progress=False)
    return settings, summary, tmp


def test_training_in_the_loop_learns_the_preference(trained):
    settings, summary, tmp = trained
    assert summary["finished"] and summary["step"] == 24  # 16 pairs / 4 per batch x 6 epochs
    # a random head starts near 50%; the held-out pairs (other dialogues) are ranked right after training
    assert summary["best_score"] == 1.0
    metrics = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m.get("kind") == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] and "reward_accuracy" in train_rows[-1]
    scorer = RewardScorer.load(tmp / "run" / "best")
    from lmlab.align.prefs import read_preferences

    assert scorer.accuracy(read_preferences(settings.eval_prefs))["accuracy"] == 1.0


def test_mfu_counts_the_backbone_matmuls_not_the_wrapper_parameters(trained):
    """MFU of the reward job: 6 x (the backbone's matmul parameters + the head) per token, not every parameter
    (the embedding table, a look-up, once doubled MiniLM's count and the logged MFU read 100%)."""
    from lmlab.training.loop import _flop_core, _flop_params
    from lmlab.training.metrics import matmul_params

    backbone = _tiny("encoder")
    model = RewardModel(backbone)
    assert _flop_core(model) is backbone
    assert _flop_params(model) == matmul_params(backbone) + backbone.config.d_model + 1  # + the head
    assert _flop_params(model) < sum(p.numel() for p in model.parameters())
    assert _flop_params(backbone) == matmul_params(backbone)
    _, summary, tmp = trained
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 for r in rows if r.get("kind") == "train") and 0 < summary["mfu"] < 1


def test_save_load_round_trip_gives_the_same_scores(trained, tiny_model_dir):
    settings, _, tmp = trained
    model, tokenizer, config = load_reward(tmp / "run" / "final")
    assert config.pooling == "last" and config.arch == "decoder" and config.lora is None
    assert config.trained_on["pairs"] == 16
    row = encode_example("#Person1#: hi\n#Person2#: hello", GOOD[0], tokenizer, config)
    with torch.no_grad():
        direct = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)).item()
    again = RewardScorer.load(tmp / "run" / "final").score(["#Person1#: hi\n#Person2#: hello"], [GOOD[0]])[0]
    assert again == pytest.approx(direct, abs=1e-5)
    with pytest.raises(CheckpointError, match="is not a reward model"):
        load_reward(tiny_model_dir)


def test_resume_with_other_settings_is_refused_and_a_finished_run_needs_resume(trained):
    settings, _, _ = trained
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train_reward(settings, show_progress=False)
    import dataclasses

    with pytest.raises(CheckpointError, match=r"made for another model or job \(reward differs in: lr\)"):
        train_reward(dataclasses.replace(settings, lr=1e-4), resume=True, show_progress=False)


def test_lora_reward_model_trains_only_adapters_and_head(tiny_model_dir, tmp_path):
    train = _pairs(tmp_path / "train.jsonl", 4)
    summary = train_reward(RewardSettings(base=str(tiny_model_dir), prefs=str(train), out=str(tmp_path / "run"),
                                          lora=True, lora_r=4, epochs=1, batch_size=2, lr=1e-3, max_len=160),
                           show_progress=False)
    assert summary["finished"]
    model, _, config = load_reward(tmp_path / "run" / "best")
    assert config.lora["r"] == 4 and (tmp_path / "run" / "best" / "adapter").is_dir()
    assert not (tmp_path / "run" / "best" / "backbone").exists()
    # the adapter was trained (lora_B starts at zero, so a nonzero one moved)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_response_mean_reward_model_trains_saves_and_scores_alike(tiny_model_dir, tmp_path):
    train, held = _pairs(tmp_path / "train.jsonl", 8), _pairs(tmp_path / "held.jsonl", 4, offset=1)
    summary = train_reward(RewardSettings(base=str(tiny_model_dir), prefs=str(train), eval_prefs=str(held),
                                          out=str(tmp_path / "run"), pooling="response_mean", epochs=2, batch_size=4,
                                          lr=3e-3, warmup_steps=1, eval_every=2, max_len=160), show_progress=False)
    assert summary["finished"] and "accuracy" in summary["metrics"]
    model, tokenizer, config = load_reward(tmp_path / "run" / "final")
    assert config.pooling == "response_mean" and model.pooling == "response_mean"
    from lmlab.align.prefs import read_preferences

    pairs = read_preferences(held)
    # the loop's held-out accuracy (rows collated with their response lengths) is the scorer's on the saved model
    assert RewardScorer(model, tokenizer, config).accuracy(pairs)["accuracy"] == summary["metrics"]["accuracy"]
    with pytest.raises(ConfigError, match="--pooling"):
        train_reward(RewardSettings(base=str(tiny_model_dir), prefs=str(train), out=str(tmp_path / "bad"),
                                    pooling="max"), show_progress=False)


def test_score_cli_single_and_file(trained, tmp_path, capsys):
    _, _, tmp = trained
    best = str(tmp / "run" / "best")
    scorer = RewardScorer.load(best)
    expected = scorer.score(["#Person1#: hi"], [GOOD[1]])[0]
    assert main(["reward", "score", "--reward", best, "--prompt", "#Person1#: hi", "--summary", GOOD[1]]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(expected, abs=1e-5)
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"dialogue": "#Person1#: hi", "summary": GOOD[1]}) + "\n"
                    + json.dumps({"prompt": "#Person1#: hi", "summary": BAD[0], "id": 7}) + "\n")
    assert main(["reward", "score", "--reward", best, "--file", str(path)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0]["reward"] == pytest.approx(expected, abs=1e-5) and out[1]["id"] == 7
    assert out[0]["reward"] > out[1]["reward"]
    assert main(["reward", "eval", "--reward", best, "--prefs", str(tmp / "held.jsonl")]) == 0
    assert "pairwise accuracy 1.000 on 8 pairs" in capsys.readouterr().out
    path.write_text(json.dumps({"summary": "x"}) + "\n")
    assert main(["reward", "score", "--reward", best, "--file", str(path)]) == 2
    assert "s.jsonl:1: a record to score needs 'prompt'" in capsys.readouterr().err
    assert main(["reward", "score", "--reward", best, "--summary", "x"]) == 2
    assert "needs --prompt" in capsys.readouterr().err


def test_a_different_policy_tokenizer_is_a_one_line_error(trained, minilm_path):
    from lmlab.checkpoints import load_tokenizer

    _, _, tmp = trained
    _, tokenizer, config = load_reward(tmp / "run" / "best")
    check_same_tokenizer(config, tokenizer, "tiny")  # the same tokenizer passes
    with pytest.raises(ConfigError, match=r"uses another tokenizer than the policy 'minilm'") as err:
        check_same_tokenizer(config, load_tokenizer(minilm_path), "minilm")
    assert "\n" not in str(err.value)
    assert tokenizer_fingerprint(tokenizer) == config.tokenizer


def test_bad_training_input(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no preference pairs"):
        train_reward(RewardSettings(base=str(tiny_model_dir), prefs=str(empty), out=str(tmp_path / "r")),
                     show_progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'chosen' and 'rejected' are the same"):
        train_reward(RewardSettings(base=str(tiny_model_dir), prefs=str(bad), out=str(tmp_path / "r")),
                     show_progress=False)


# --- best-of-n ---------------------------------------------------------------------------------------
from lmlab.align.best_of_n import best_of_n  # noqa: E402
from lmlab.generation import GenerationConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_reward(tiny_model_dir, tmp_path_factory):
    """A reward model on the tiny decoder (random head), saved; it shares the policy's tokenizer."""
    import lmlab
    from lmlab.align.reward import default_recipe, save_reward

    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    backbone = lmlab.load_model(tiny_model_dir)
    torch.manual_seed(1)
    model = RewardModel(backbone)
    config = RewardConfig(base=str(tiny_model_dir), arch="decoder", pooling="last",
                          **default_recipe("decoder", tokenizer), max_len=256, tokenizer=tokenizer_fingerprint(tokenizer))
    path = tmp_path_factory.mktemp("tiny-reward") / "reward"
    save_reward(model, path, config, tokenizer)
    return path


def test_best_of_n_keeps_the_sample_the_reward_model_prefers(tiny_model_dir, tiny_reward):
    import lmlab

    policy, tokenizer = lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)
    scorer = RewardScorer.load(tiny_reward)
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0)
    dialogue = "#Person1#: Where is the station?\n#Person2#: Two blocks north."
    prompts = ["Summarize:\n" + dialogue]
    first = best_of_n(policy, tokenizer, prompts, [dialogue], 4, config, scorer, seeds=[5])[0]
    assert len(first.candidates) == 4 and len(set(first.candidates)) == 4  # distinct samples of one prompt
    # set the head so that candidate 2 (not the first: ties keep the first) scores 1 and every other 0:
    # w solves H w = e_2 for the candidates' pooled states H (4 x 64, full rank), bias 0
    target = 2
    rows = [encode_example(dialogue, c, scorer.tokenizer, scorer.config) for c in first.candidates]
    with torch.no_grad():
        H = torch.stack([scorer.model.pooled(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0]
                         for r in rows])  # (4, C)
        w = torch.linalg.pinv(H.double()) @ torch.eye(4, dtype=torch.float64)[target]  # (C,)
        scorer.model.head.weight.copy_(w.float()[None])
        scorer.model.head.bias.zero_()
    again = best_of_n(policy, tokenizer, prompts, [dialogue], 4, config, scorer, seeds=[5])[0]
    assert again.candidates == first.candidates  # same seeds, same samples
    assert again.index == target and again.text == first.candidates[target]
    # fp32 pooled states of norm O(1): H w reproduces e_2 to ~1e-5, far inside the 0.5 gap
    assert again.scores[target] == pytest.approx(1.0, abs=1e-3) and max(
        s for k, s in enumerate(again.scores) if k != target) == pytest.approx(0.0, abs=1e-3)
    # the same prompt in a batch with another: its candidates do not change
    both = best_of_n(policy, tokenizer, ["Other:\n#Person1#: hi", prompts[0]], ["#Person1#: hi", dialogue], 4, config,
                     scorer, seeds=[9, 5])
    assert both[1].candidates == first.candidates and both[1].index == target
    with pytest.raises(ConfigError, match="--best-of 4 needs sampling"):
        best_of_n(policy, tokenizer, prompts, [dialogue], 4, GenerationConfig(max_new_tokens=4), scorer)


def _tiny_adapter(tiny_model_dir, path):
    """A LoRA adapter on the tiny decoder with random nonzero weights (the lab's finetuned experiments need one)."""
    import lmlab
    from lmlab.adapt.lora import LoraConfig, apply_lora
    from lmlab.adapt.peft import save_adapter

    model = lmlab.load_model(tiny_model_dir)
    lora = LoraConfig(r=2, alpha=4, targets=("q", "v", "up", "down"))
    apply_lora(model, lora)
    torch.manual_seed(3)
    with torch.no_grad():  # large enough that the adapter's samples differ from the base model's
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=3.0)
    save_adapter(model, path, lora, base_model=str(tiny_model_dir))
    return path


def test_lab_best_of_4_experiment(tiny_model_dir, tiny_reward, tmp_path):
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    common = dict(model=str(tiny_model_dir), limit=3, max_new_tokens=5, adapter=adapter, batch_size=2)
    with pytest.raises(ConfigError, match="finetuned-best-of-4 need a reward model: pass --reward DIR"):
        run_lab(LabSettings(**common, experiments="finetuned-best-of-4", out=tmp_path / "x"), echo=lambda t: None)
    texts = []
    result = run_lab(LabSettings(**common, experiments="finetuned,finetuned-best-of-4", reward=tiny_reward,
                                 out=tmp_path / "lab"), echo=texts.append, progress=False)
    scorer = RewardScorer.load(tiny_reward)
    best_rows = [r for r in result.rows if r["experiment"] == "finetuned-best-of-4"]
    assert len(best_rows) == 3
    for row in best_rows:
        rewards = [c["reward"] for c in row["candidates"]]
        assert len(rewards) == 4 and row["reward"] == max(rewards)
        assert row["summary"] == row["candidates"][rewards.index(max(rewards))]["summary"]
    dialogue = {d.id: d.dialogue for d in __import__("lmlab.tasks.summarize.data", fromlist=["x"]).load_dialogues().records}
    for row in result.rows:  # every row's reward is the reward model's score of its summary
        assert row["reward"] == pytest.approx(scorer.score([dialogue[row["id"]]], [row["summary"]])[0], abs=1e-4)
    assert "mean reward-model score" in texts[-1] and "finetuned-best-of-4" in texts[-1]
    # the rows of the plain experiments keep their spec hash (the new field does not change it)
    from lmlab.tasks.summarize.experiments import EXPERIMENTS, spec_hash

    assert spec_hash(EXPERIMENTS["finetuned"], "a") == spec_hash(EXPERIMENTS["finetuned"], "a", reward="other")
    assert spec_hash(EXPERIMENTS["finetuned-best-of-4"], "a", "r1") != spec_hash(EXPERIMENTS["finetuned-best-of-4"], "a", "r2")


def test_summarize_best_of_cli(tiny_model_dir, tiny_reward, capsys):
    dialogue = "#Person1#: Where is the station?\n#Person2#: Two blocks north."
    argv = ["summarize", dialogue, "--model", str(tiny_model_dir), "--no-adapter", "--max-new-tokens", "5"]
    assert main(argv + ["--best-of", "3", "--reward", str(tiny_reward), "--do-sample", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line[2:].startswith("reward ")]
    assert len(lines) == 3
    parsed = [(line[0], float(line[2:].split()[1]), line[2:].split(None, 2)[2:]) for line in lines]  # mark, score, text
    starred = [p for p in parsed if p[0] == "*"]
    assert len(starred) == 1 and starred[0][1] == max(p[1] for p in parsed)
    assert captured.out.strip() == (starred[0][2][0].strip() if starred[0][2] else "")
    for extra, message in [(["--best-of", "3", "--do-sample"], "--best-of 3 needs --reward DIR"),
                           (["--best-of", "3", "--reward", str(tiny_reward)], "--best-of 3 needs --do-sample"),
                           (["--reward", str(tiny_reward)], "--reward is used by --best-of N")]:
        assert main(argv + extra) == 2
        assert message in capsys.readouterr().err


def test_a_saved_minilm_reward_model_reads_its_input_as_in_training(minilm_path, tmp_path):
    """Real all-MiniLM-L6-v2: save, load, and the scores (so the [CLS] ... [SEP] input) are the same."""
    import lmlab
    from lmlab.align.reward import default_recipe, save_reward

    tokenizer = lmlab.load_tokenizer(minilm_path)
    model = RewardModel(lmlab.load_model(minilm_path)).eval()
    config = RewardConfig(base=str(minilm_path), arch="encoder", pooling="mean", **default_recipe("encoder", tokenizer),
                          max_len=128, tokenizer=tokenizer_fingerprint(tokenizer))
    save_reward(model, tmp_path / "r", config, tokenizer)
    before = RewardScorer(model, tokenizer, config).score(["#Person1#: Hi.\n#Person2#: Hello."], ["They greet."])[0]
    loaded = RewardScorer.load(tmp_path / "r")
    row = encode_example("#Person1#: Hi.", "They greet.", loaded.tokenizer, loaded.config)
    assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    after = loaded.score(["#Person1#: Hi.\n#Person2#: Hello."], ["They greet."])[0]
    assert after == pytest.approx(before, abs=1e-5)  # same weights, same ids: fp32 sums of 384 terms
