"""Fine-tuning: the SFT objective, the data path, LoRA and full runs in the one loop, resume, merge, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.adapt import LoRALinear
from lmlab.adapt.recipe import Recipe
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.model import Transformer
from lmlab.objectives.base import IGNORE_INDEX
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.training.finetune import finetune, load_finetune_config
from lmlab.training.sft_data import SFTBatches, Tokenized
from lmlab.training.loop import Job, fit


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory) -> Path:
    """The bundled dialogues as DialogSum-style JSONL (28 records)."""
    path = tmp_path_factory.mktemp("data") / "dialogues.jsonl"
    records = load_dialogues().records
    path.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in records))
    return path


def _config(model_dir, data, out, *sets):
    return load_finetune_config(None, [
        f"base_model={model_dir}", f"out_dir={out}", "data.task=dialogsum", "data.max_seq_len=384",
        f"data.train=[{{path: {data}, records: '0:20'}}]", f"data.validation={{path: {data}, records: '20:28'}}",
        "eval.rouge_examples=4", "eval.max_new_tokens=8", "train.steps=6", "train.batch_size=4", "train.lr=5e-3",
        "train.warmup_steps=1", "train.eval_every=3", "train.ckpt_every=2", "lora.r=4", "lora.dropout=0.1",
        "train.device=cpu", *sets])


# --- the objective ----------------------------------------------------------------------------
def test_decoder_labels_cover_the_response_only():
    sft = SupervisedFineTuning("decoder", pad_token_id=0)
    batch = sft.collate([([5, 6, 7], [8, 9, 1]), ([5, 6], [9, 1])])
    # row 0: tokens 5 6 7 8 9 1 -> inputs 5 6 7 8 9, targets 6 7 8 9 1; only 8 9 1 (the response) count
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 9, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9, 1], [IGNORE_INDEX, 9, 1] + [IGNORE_INDEX] * 2]
    assert "attention_mask" not in batch  # right padding under the causal mask: no real token sees it


def test_encoder_decoder_maps_input_to_shifted_target():
    sft = SupervisedFineTuning("encoder_decoder", pad_token_id=0, decoder_start_token_id=0)
    batch = sft.collate([([5, 6, 7, 1], [8, 9, 1]), ([5, 1], [9, 1])])
    assert batch["decoder_input_ids"].tolist() == [[0, 8, 9], [0, 9, 0]]
    assert batch["labels"].tolist() == [[8, 9, 1], [9, 1, IGNORE_INDEX]]
    model = Transformer(ModelConfig.from_name("tiny-encoder-decoder"))
    loss, n = sft.loss(model, batch)
    loss.backward()
    assert int(n) == 5 and torch.isfinite(loss) and model.encoder.layers[0].attn.q.weight.grad is not None


def test_loss_equals_full_logits_cross_entropy_on_response_positions():
    """The head on response positions only gives the loss of full logits; padding changes no real position."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    sft = SupervisedFineTuning("decoder", pad_token_id=0)
    batch = sft.collate([([5, 6, 7], [8, 9, 1]), ([5, 6], [9, 1])])
    loss, n = sft.loss(model, batch)
    logits = model(batch["input_ids"])  # (B, T, V) everywhere
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    assert int(n) == 5 and abs(loss.item() - ref.item()) < 1e-5  # the same sum over 5 terms, fp32 rounding only
    alone = model(batch["input_ids"][1:, :3])  # row 1 unpadded
    assert (alone - logits[1:, :3]).abs().max() < 1e-5  # same numbers up to fp32 kernel rounding
    with pytest.raises(ConfigError, match="arch='encoder'"):
        SupervisedFineTuning("encoder", pad_token_id=0)


def test_more_ranks_than_examples_count_each_example_once():
    from lmlab.training.distributed import DistEnv

    # 3 examples in batches of 2 over 4 ranks: in every batch at least two ranks have nothing of their own
    examples = [Tokenized(f"e{i}", [5, 6], [7 + i] * (i + 1) + [1], False) for i in range(3)]  # 2, 3, 4 labels
    sft = SupervisedFineTuning("decoder", pad_token_id=0)
    world = 4
    ranks = [SFTBatches([(examples, 1.0)], sft, batch_size=2, seed=0, env=DistEnv(rank=r, world_size=world))
             for r in range(world)]
    for step in range(len(ranks[0]._epoch_batches(0))):
        batch = ranks[0]._batches[ranks[0].position]
        micro = [r.next_micro_batches(step, 1)[0] for r in ranks]
        counts = [sft.count(m) for m in micro]
        # each example's labels are counted once over all ranks: its response length (+ eos), no more
        assert sum(counts) == sum(len(e.response) for e in batch)
        assert sorted(c for c in counts if c) == sorted(len(e.response) for e in batch)
        assert counts[len(batch):] == [0] * (world - len(batch))  # the ranks left over count for nothing
        assert all(m["input_ids"].shape[0] == 1 for m in micro)  # ... but still run a forward/backward


def test_batches_mix_sources_by_weight_bucket_by_length_and_resume():
    from lmlab.training.distributed import DistEnv

    env = DistEnv(mode="none", rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    a = [Tokenized(f"a{i}", [1] * (i + 1), [2], False) for i in range(8)]
    b = [Tokenized(f"b{i}", [1] * (i + 1), [2], False) for i in range(8)]
    sft = SupervisedFineTuning("decoder", pad_token_id=0)
    batches = SFTBatches([(a, 2.0), (b, 0.5)], sft, batch_size=4, seed=0, env=env)
    epoch = batches._epoch_batches(0)
    ids = [e.id for batch in epoch for e in batch]
    assert len(ids) == 16 + 4 and sum(i.startswith("a") for i in ids) == 16  # a twice, half of b
    first = batches.next_micro_batches(0, 3)
    state = batches.state_dict()
    later = batches.next_micro_batches(3, 4)  # crosses into the next epoch
    again = SFTBatches([(a, 2.0), (b, 0.5)], sft, batch_size=4, seed=0, env=env)
    again.load_state_dict(state)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(later, again.next_micro_batches(3, 4)))
    assert len(first) == 3


# --- the loop's selection and early stopping ---------------------------------------------------------
class _Fixed:
    def next_micro_batches(self, step, n):
        torch.manual_seed(step)
        return [SupervisedFineTuning("decoder", 0).collate([([3, 4], [5, 1])])] * n

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_fit_keeps_the_best_by_the_selected_metric_and_stops_early(tmp_path):
    from lmlab.training.config import TrainSection
    from lmlab.training.distributed import DistEnv

    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9])
    best_calls = []
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    job = Job(name="t", model=model, objective=SupervisedFineTuning("decoder", 0), batches=_Fixed(),
              evaluate=lambda m: {"rouge1": next(scores)}, select="rouge1",
              on_best=lambda step, metrics: best_calls.append((step, metrics["rouge1"])), patience=2)
    env = DistEnv(mode="none", rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    t = TrainSection(steps=20, batch_size=1, eval_every=2, ckpt_every=0, log_every=1, warmup_steps=1)
    summary = fit(job, t, env, tmp_path, None, show_progress=False)
    # evaluations at steps 2, 4, 6, 8: 0.1 best, 0.3 best, 0.2 worse, 0.25 worse -> patience 2 reached
    assert best_calls == [(2, 0.1), (4, 0.3)]
    assert summary["stopped_early"] and summary["step"] == 8 and summary["best_step"] == 4
    assert summary["best_score"] == pytest.approx(0.3)


def test_an_evaluation_that_draws_random_numbers_leaves_the_training_stream_alone(tmp_path):
    """Dropout after an evaluation must not depend on what the evaluation drew (exact resume relies on it)."""
    from lmlab.training.config import TrainSection
    from lmlab.training.distributed import DistEnv

    def train(evaluate, out):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny-decoder", dropout=0.2))
        job = Job(name="t", model=model, objective=SupervisedFineTuning("decoder", 0), batches=_Fixed(),
                  evaluate=evaluate)
        env = DistEnv(mode="none", rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        fit(job, TrainSection(steps=4, batch_size=1, eval_every=1, ckpt_every=0, log_every=1, warmup_steps=1),
            env, out, None, show_progress=False)
        return model.state_dict()

    quiet = train(lambda m: {"val_loss": 1.0}, tmp_path / "a")
    noisy = train(lambda m: {"val_loss": float(torch.randn(1000).sum())}, tmp_path / "b")
    assert all(torch.equal(quiet[k], noisy[k]) for k in quiet)


# --- whole runs on a tiny model ----------------------------------------------------------------
def test_lora_run_learns_saves_peft_adapters_and_resumes_exactly(tiny_model_dir, dialogues, tmp_path):
    s = finetune(_config(tiny_model_dir, dialogues, tmp_path / "a"), show_progress=False)
    assert s["finished"] and s["step"] == 6 and s["trainable_parameters"] > 0
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0]  # lr 5e-3 on 20 pairs: the response loss falls within 6 steps
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all("rouge1" in r and "val_loss" in r for r in evals)
    for name in ("best", "final"):
        files = {f.name for f in (tmp_path / "a" / name).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "lmlab_recipe.json"} <= files
    assert (tmp_path / "a" / "loss.png").exists()

    # the adapter changes the model; without it, the base model is back
    base = lmlab.load_model(tiny_model_dir)
    tuned = lmlab.load_model(tiny_model_dir, adapter=tmp_path / "a" / "final")
    assert sum(isinstance(m, LoRALinear) for m in tuned.modules()) == 4 * base.config.n_layers + 3 * base.config.n_layers
    ids = torch.randint(0, base.config.vocab_size, (1, 12))
    assert (tuned(ids) - base(ids)).abs().max() > 1e-4

    # interrupted after 2 steps and resumed: the same adapter, bit for bit (dropout, data order, optimizer)
    first = finetune(_config(tiny_model_dir, dialogues, tmp_path / "b", "train.stop_after=2"), show_progress=False)
    assert not first["finished"]
    finetune(_config(tiny_model_dir, dialogues, tmp_path / "b"), resume=True, show_progress=False)
    from safetensors.torch import load_file

    want = load_file(str(tmp_path / "a" / "final" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "b" / "final" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # a changed config is refused, and nothing already trained is touched
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="lora"):
        finetune(_config(tiny_model_dir, dialogues, tmp_path / "b", "lora.r=8"), resume=True, show_progress=False)
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before


def test_full_finetune_saves_a_loadable_model(tiny_model_dir, dialogues, tmp_path):
    s = finetune(_config(tiny_model_dir, dialogues, tmp_path, "method=full", "train.steps=2", "train.eval_every=0",
                         "train.lr=1e-3"), show_progress=False)
    assert s["trainable_parameters"] == lmlab.load_model(tiny_model_dir).num_parameters()
    model = lmlab.load_model(tmp_path / "final")
    assert Recipe.load(tmp_path / "final").template == "instruction"
    base = lmlab.load_model(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_long_prompts_are_cut_in_the_middle_and_counted(tiny_model_dir, dialogues, tmp_path, capsys):
    s = finetune(_config(tiny_model_dir, dialogues, tmp_path, "data.max_seq_len=200", "train.steps=1",
                         "train.eval_every=0"), show_progress=True)
    assert s["truncated_prompts"] > 0
    assert f"{s['truncated_prompts']} prompts cut in the middle" in capsys.readouterr().out
    with pytest.raises(DataError, match="does not fit data.max_seq_len=100"):  # the template alone is longer
        finetune(_config(tiny_model_dir, dialogues, tmp_path / "x", "data.max_seq_len=100"), show_progress=False)


def test_cli_finetune_then_generate_and_merge(tiny_model_dir, dialogues, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--base", str(tiny_model_dir), "--task", "dialogsum", "--data", f"{dialogues}:0:12",
                 "--validation", f"{dialogues}:20:24", "--steps", "2", "--batch-size", "4", "--rank", "2",
                 "--targets", "q,v", "--out", str(out), "--no-progress", "--set", "eval.rouge_examples=2",
                 "--set", "eval.max_new_tokens=4", "--device", "cpu"])
    assert code == 0 and "best weights in" in capsys.readouterr().out
    adapter = out / "best"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2

    assert main(["generate", str(tiny_model_dir), "hello", "--adapter", str(adapter), "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tiny_model_dir), str(adapter), str(tmp_path / "merged")]) == 0
    merged = lmlab.load_model(tmp_path / "merged")
    with_adapter = lmlab.load_model(tiny_model_dir, adapter=adapter)
    ids = torch.randint(0, merged.config.vocab_size, (2, 10))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    # W + s*BA folded once vs applied per call: fp32 rounding of O(1) logits through 2 layers
    assert (merged(ids) - with_adapter(ids)).abs().max() < 1e-4
    assert main(["export", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0


@pytest.mark.parametrize("sets, error, message", [
    (["data.train=[{path: MISSING}]"], DataError, "does not exist"),
    (["lora.targets=[nope]"], ConfigError, "'nope' matches no linear layer; available:"),
    (["method=half"], ConfigError, "method='half'"),
    (["data.train=[]"], ConfigError, "data.train is empty"),
])
def test_bad_config_is_one_clear_error(tiny_model_dir, dialogues, tmp_path, sets, error, message):
    sets = [s.replace("MISSING", str(tmp_path / "missing.jsonl")) for s in sets]
    with pytest.raises(error, match=message):
        finetune(_config(tiny_model_dir, dialogues, tmp_path / "run", *sets), show_progress=False)


def test_empty_response_and_no_valid_records_name_the_problem(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"dialogue": "#Person1#: hi\n#Person2#: hello", "summary": "  "}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: response field 'summary' is missing or empty"):
        finetune(_config(tiny_model_dir, bad, tmp_path / "run", f"data.train=[{{path: {bad}}}]",
                         "data.validation=null"), show_progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no valid records"):
        finetune(_config(tiny_model_dir, empty, tmp_path / "run", f"data.train=[{{path: {empty}}}]",
                         "data.validation=null"), show_progress=False)
    assert main(["finetune", "--base", str(tiny_model_dir), "--task", "dialogsum", "--data", str(empty),
                 "--out", str(tmp_path / "cli")]) == 2


def test_merge_refuses_a_mismatched_base(tiny_model_dir, dialogues, tmp_path, capsys):
    finetune(_config(tiny_model_dir, dialogues, tmp_path / "run", "train.steps=1", "train.eval_every=0"),
             show_progress=False)
    other = tmp_path / "other"
    tok = lmlab.load_tokenizer(tiny_model_dir)
    lmlab.save_model(Transformer(ModelConfig.from_name("tiny-decoder", d_model=48, vocab_size=tok.vocab_size)), other, tok)
    assert main(["merge", str(other), str(tmp_path / "run" / "final"), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this base model" in err and "Traceback" not in err and not (tmp_path / "merged").exists()


# --- the lab's finetuned experiment ------------------------------------------------------------
def test_lab_finetuned_experiment_switches_the_adapter_on_only_for_itself(tiny_model_dir, dialogues, tmp_path):
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    finetune(_config(tiny_model_dir, dialogues, tmp_path / "run", "train.steps=2", "train.eval_every=0",
                     "train.lr=5e-2"), show_progress=False)
    adapter = tmp_path / "run" / "final"
    quiet = {"echo": lambda text: None, "progress": False}
    common = dict(model=str(tiny_model_dir), limit=3, max_new_tokens=6, precision="fp32")  # fp32: compared below
    with_adapter = run_lab(LabSettings(**common, experiments="zero-shot-instruction,finetuned", adapter=adapter,
                                       out=tmp_path / "lab"), **quiet)
    without = run_lab(LabSettings(**common, experiments="zero-shot-instruction", out=tmp_path / "plain"), **quiet)
    rows = {(r["experiment"], r["id"]): r for r in with_adapter.rows}
    plain = {r["id"]: r for r in without.rows}
    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    recipe = Recipe.load(adapter)
    for (experiment, example_id), row in rows.items():
        if experiment == "zero-shot-instruction":  # the adapter is off: exactly the base model's output
            assert row["output"] == plain[example_id]["output"]
        else:  # the prompt the adapter was trained on
            dialogue = next(d.dialogue for d in load_dialogues().records if d.id == example_id)
            assert row["prompt"] == recipe.prompt(dialogue, tokenizer).text
    base = lmlab.load_model(tiny_model_dir)
    tuned = lmlab.load_model(tiny_model_dir, adapter=adapter)
    ids = torch.randint(0, base.config.vocab_size, (1, 8))
    assert (tuned(ids) - base(ids)).abs().max() > 1e-3  # so "off" above really switched something off
    # ... and the adapter's own output: the base + adapter model, loaded apart from the lab, greedy on those
    # prompts (one batch, as in the lab) writes exactly the finetuned rows
    from lmlab.generation import generate
    from lmlab.tasks.summarize.experiments import generation_config, parse_experiments

    tuned_ids = [i for e, i in rows if e == "finetuned"]
    config = generation_config(parse_experiments("finetuned")[0], 6, 0, recipe.chat)
    own = generate(tuned, tokenizer, [rows[("finetuned", i)]["prompt"] for i in tuned_ids], config)
    assert len(tuned_ids) == 3 and [rows[("finetuned", i)]["output"] for i in tuned_ids] == own
    assert generate(base, tokenizer, [rows[("finetuned", i)]["prompt"] for i in tuned_ids], config) != own


def test_lab_finetuned_needs_an_adapter_for_models_lmlab_ships_none_for(tiny_model_dir, tmp_path):
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    with pytest.raises(ConfigError, match="pass --adapter DIR"):
        run_lab(LabSettings(model=str(tiny_model_dir), experiments="finetuned", out=tmp_path), echo=lambda t: None)


def test_summarize_uses_the_shipped_adapter_by_default(tiny_model_dir, dialogues, tmp_path, monkeypatch, capsys):
    from lmlab.adapt import recipe as recipe_module

    finetune(_config(tiny_model_dir, dialogues, tmp_path / "run", "train.steps=1", "train.eval_every=0"),
             show_progress=False)
    monkeypatch.setattr(recipe_module, "ADAPTERS_DIR", tmp_path / "run")
    monkeypatch.setitem(recipe_module.SHIPPED_ADAPTERS, str(tiny_model_dir), "final")
    dialogue = "#Person1#: Where is the station?\n#Person2#: Two blocks north."
    assert main(["summarize", "--model", str(tiny_model_dir), dialogue, "--max-new-tokens", "3"]) == 0
    assert f"fine-tuned summarizer: adapter {tmp_path / 'run' / 'final'}" in capsys.readouterr().err
    assert main(["summarize", "--model", str(tiny_model_dir), dialogue, "--max-new-tokens", "3", "--no-adapter"]) == 0
    assert "fine-tuned summarizer" not in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_adapter_summarizes_real_dialogues(smollm2_path, dialogsum_dev):
    """The adapter inside the package fits the real SmolLM2 and summarizes held-out dialogues (records 400+)."""
    from lmlab.adapt.recipe import shipped_adapter
    from lmlab.generation import GenerationConfig, generate
    from lmlab.tasks.summarize.rouge import corpus_score, score_example

    adapter = shipped_adapter("smollm2-135m-instruct")
    assert adapter is not None and (adapter / "README.md").exists()  # the license note travels with it
    assert (adapter / "adapter_model.safetensors").stat().st_size < 25 * 2**20
    model = lmlab.load_model("smollm2-135m-instruct", adapter=adapter)
    tokenizer = lmlab.load_tokenizer("smollm2-135m-instruct")
    recipe = Recipe.load(adapter)
    records = [json.loads(line) for line in dialogsum_dev.read_text().splitlines()][400:408]
    prompts = [recipe.prompt(r["dialogue"], tokenizer).text for r in records]
    summaries = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=64))
    assert all(s.strip() and "#Person1#:" not in s for s in summaries)  # no empty or recited summaries
    rouge1 = corpus_score([score_example(s, r["summary"]) for s, r in zip(summaries, records)])["rouge1"]
    assert rouge1 > 0.3  # prompting alone scores about 0.2 on these dialogues; the adapter about 0.4


# --- label smoothing and NEFTune -----------------------------------------------------------------
def _sft_batch():
    return [([5, 6, 7], [8, 9, 1]), ([5, 6], [9, 1])]


def test_label_smoothing_is_cross_entropy_with_smoothed_targets_on_the_response():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder")).eval()
    plain = SupervisedFineTuning("decoder", pad_token_id=0)
    smooth = SupervisedFineTuning("decoder", pad_token_id=0, label_smoothing=0.1)
    batch = smooth.collate(_sft_batch())
    loss, n = smooth.loss(model, batch)
    logits = model(batch["input_ids"]).flatten(0, 1)  # (B*T, V)
    ref = torch.nn.functional.cross_entropy(logits, batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                            label_smoothing=0.1)
    assert int(n) == 5 and abs(loss.item() - ref.item()) < 1e-5
    assert abs(loss.item() - plain.loss(model, batch)[0].item()) > 1e-3


def test_neftune_noise_in_training_only_bounded_and_unhooked():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    assert model.config.dropout == 0 and model.config.attn_dropout == 0  # train mode differs by the noise only
    plain = SupervisedFineTuning("decoder", pad_token_id=0)
    noisy = SupervisedFineTuning("decoder", pad_token_id=0, neftune_alpha=5.0)
    batch = noisy.collate(_sft_batch())
    model.train()
    assert abs(noisy.loss(model, batch)[0].item() - plain.loss(model, batch)[0].item()) > 1e-5
    assert len(model.tok_embed._forward_hooks) == 0  # the hook is gone after the loss
    model.eval()
    assert noisy.loss(model, batch)[0].item() == plain.loss(model, batch)[0].item()  # no noise in evaluation
    # the noise the hook adds: uniform in [-alpha / sqrt(T C), +alpha / sqrt(T C)]
    emb = torch.zeros(2, 50, 64)
    noise = noisy._neftune(None, None, emb)
    bound = 5.0 / (50 * 64) ** 0.5
    assert noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound and noise.std() > 0.5 * bound


@pytest.mark.parametrize("kwargs, message", [
    ({"label_smoothing": -1}, "label_smoothing=-1 must be in"), ({"label_smoothing": 1.0}, "label_smoothing=1.0"),
    ({"neftune_alpha": -1}, "neftune_alpha=-1 must be >= 0"),
])
def test_bad_smoothing_or_neftune_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SupervisedFineTuning("decoder", pad_token_id=0, **kwargs)


def test_finetune_config_passes_smoothing_and_neftune_to_the_objective(tiny_model_dir, dialogues, tmp_path,
                                                                      monkeypatch):
    import lmlab.training.finetune as finetune_mod

    seen = []

    class Spy(SupervisedFineTuning):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append((self.label_smoothing, self.neftune_alpha))

    monkeypatch.setattr(finetune_mod, "SupervisedFineTuning", Spy)
    s = finetune(_config(tiny_model_dir, dialogues, tmp_path / "n", "train.neftune_alpha=5",
                         "train.label_smoothing=0.1", "train.steps=1", "train.eval_every=0", "eval.rouge_examples=0"),
                 show_progress=False)
    assert s["finished"] and seen and seen[0] == (0.1, 5.0)
    with pytest.raises(ConfigError, match="label_smoothing=1.0"):
        finetune(_config(tiny_model_dir, dialogues, tmp_path / "bad", "train.label_smoothing=1.0"), show_progress=False)
