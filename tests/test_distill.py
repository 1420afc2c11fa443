"""Distillation: the KL loss, layer-subset students, the pseudo-label cache, the guards, a tiny run through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.adapt.recipe import Recipe
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, DataError
from lmlab.model import Transformer
from lmlab.objectives.base import IGNORE_INDEX
from lmlab.objectives.distill import TokenDistillation, distillation_kl
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.training import pseudo_labels
from lmlab.training.distill import (StudentSection, build_student, check_holdout, distill, keep_layers,
                                    load_distill_config, parse_keep_layers)


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory) -> Path:
    """The bundled dialogues as DialogSum-style JSONL (28 records)."""
    path = tmp_path_factory.mktemp("data") / "dialogues.jsonl"
    records = load_dialogues().records
    path.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in records))
    return path


def _decoder(n_layers: int = 4, vocab: int = 50) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny-decoder", n_layers=n_layers, vocab_size=vocab)).eval()


# --- the KL loss ------------------------------------------------------------------------------
def test_kl_matches_closed_forms_and_scales_by_tau_squared():
    # distributions chosen so that KL has a closed form (no softmax recomputed here):
    # teacher logits (2 ln 3, 0) at tau=2 -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # row 2 at tau=1: q = (3/4, 1/4), p = (1/2, 1/2)
    got = distillation_kl(student, teacher, 2.0)
    row1 = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))  # tau^2 * KL((3/4, 1/4) || (1/2, 1/2))
    assert got[0].item() == pytest.approx(row1, rel=1e-5)
    # row 2 at tau=1: KL((1/2, 1/2) || (3/4, 1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); tau = 1 scales by 1
    assert distillation_kl(student, teacher, 1.0)[1].item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert distillation_kl(teacher, teacher, 3.0).abs().max() < 1e-6  # a student equal to its teacher: zero


def test_kl_stays_finite_where_the_teacher_masks_tokens_with_minus_inf():
    # the teacher rules out token 2: p = (1/2, 1/2, 0); the student is uniform, q = (1/3, 1/3, 1/3)
    teacher = torch.tensor([[0.0, 0.0, float("-inf")]])
    student = torch.zeros(1, 3, requires_grad=True)
    kl = distillation_kl(student, teacher, 1.0)
    assert kl.item() == pytest.approx(math.log(1.5), rel=1e-5)  # 2 * 1/2 ln((1/2) / (1/3))
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()
    # d KL / d student logit = q - p (softmax gradient): (1/3 - 1/2, 1/3 - 1/2, 1/3)
    assert torch.allclose(student.grad, torch.tensor([[-1 / 6, -1 / 6, 1 / 3]]), atol=1e-6)


def test_token_loss_counts_response_positions_only_and_mixes_hard_labels():
    teacher, student = _decoder(2), _decoder(1)
    objective = TokenDistillation(teacher, "decoder", pad_token_id=0, temperature=2.0, alpha=0.25)
    pairs = [([5, 6, 7], [8, 9, 1]), ([5, 6], [10, 1])]
    batch = objective.collate_hard(pairs, hard=[True, False])
    keep = batch["labels"] != IGNORE_INDEX
    assert int(keep.sum()) == 5 and int(batch["hard"].sum()) == 3  # 3 + 2 response tokens; row 0 is human
    loss, n = objective.loss(student, batch)
    # by hand from the full (B, T, V) logits: padding and prompt positions never enter
    s_logits, t_logits = student(batch["input_ids"])[keep], teacher(batch["input_ids"])[keep]
    # torch's own KL (F.kl_div: target p, input log q), not the formula distillation_kl writes
    kl = F.kl_div(F.log_softmax(s_logits / 2, -1), F.softmax(t_logits / 2, -1), reduction="none").sum(-1)
    ce = F.cross_entropy(s_logits, batch["labels"][keep], reduction="none")
    hard = batch["hard"][keep].float()
    expected = (0.75 * 4 * kl + 0.25 * hard * ce).sum() / 5
    assert int(n) == 5
    assert torch.allclose(loss, expected, atol=1e-6)
    # the teacher is frozen: only the student gets gradients
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_token_loss_over_all_positions_covers_the_prompt_but_not_the_padding():
    teacher, student = _decoder(2), _decoder(1)
    objective = TokenDistillation(teacher, "decoder", pad_token_id=0, temperature=1.0, alpha=0.5, positions="all")
    pairs = [([5, 6, 7], [8, 9, 1]), ([5, 6], [10, 1])]
    batch = objective.collate_hard(pairs, hard=[False, True])
    # row 0: 5 input positions (6 tokens, the last only a target); row 1: 3 real, 2 padding
    assert batch["kl_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    loss, n = objective.loss(student, batch)
    scored, keep = batch["kl_mask"], batch["labels"] != IGNORE_INDEX
    s_all, t_all = student(batch["input_ids"]), teacher(batch["input_ids"])  # (B, T, V)
    kl = (F.softmax(t_all, -1) * (F.log_softmax(t_all, -1) - F.log_softmax(s_all, -1))).sum(-1)  # (B, T)
    ce = F.cross_entropy(s_all[keep], batch["labels"][keep], reduction="none")
    expected = 0.5 * kl[scored].mean() + 0.5 * (batch["hard"][keep].float() * ce).sum() / 5
    assert int(n) == 5  # the loop still weighs micro-batches by response tokens
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(ConfigError, match="positions='every'"):
        TokenDistillation(teacher, "decoder", 0, positions="every")


@pytest.mark.parametrize("temperature, alpha", [(0.0, 0.5), (1.0, 1.5)])
def test_bad_temperature_or_alpha_is_one_line(temperature, alpha):
    with pytest.raises(ConfigError, match="temperature=0.0|alpha=1.5"):
        TokenDistillation(_decoder(1), "decoder", 0, temperature, alpha)


# --- students ---------------------------------------------------------------------------------
def test_layer_subset_student_copies_the_teachers_weights():
    teacher = _decoder(4)
    assert parse_keep_layers("every-other", 4) == [0, 2]
    assert parse_keep_layers("3,1", 4) == [1, 3]
    student = keep_layers(teacher, [1, 3])
    assert student.config.n_layers == 2 and teacher.config.n_layers == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        source = key
        if key.startswith("decoder.layers."):
            j, rest = key[len("decoder.layers."):].split(".", 1)
            source = f"decoder.layers.{[1, 3][int(j)]}.{rest}"
        assert torch.equal(value, t_state[source]), key
    assert student.lm_head.weight.data_ptr() == student.tok_embed.weight.data_ptr()  # still tied
    # a copy, not a view: training the student leaves the teacher alone
    with torch.no_grad():
        student.decoder.layers[0].attn.q.weight.add_(1.0)
    assert not torch.equal(student.decoder.layers[0].attn.q.weight, teacher.decoder.layers[1].attn.q.weight)
    # by default a student cut from its teacher keeps every other layer, as a trainable copy
    default = build_student(StudentSection(), teacher)
    assert default.config.n_layers == 2 and default.training
    assert torch.equal(default.decoder.layers[1].ffn.down.weight, teacher.decoder.layers[2].ffn.down.weight)
    # keeping every layer gives the teacher's function
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(keep_layers(teacher, [0, 1, 2, 3])(ids), teacher(ids))


@pytest.mark.parametrize("spec", ["0,9", "x", [1, 1]])
def test_bad_keep_layers_is_one_line(spec):
    with pytest.raises(ConfigError, match="student.keep_layers"):
        parse_keep_layers(spec, 4)


def test_a_student_with_another_vocabulary_is_refused_naming_both_sizes():
    with pytest.raises(ConfigError, match=r"'tiny-decoder' has a vocabulary of 256 tokens, the teacher 50"):
        build_student(StudentSection(keep_layers=None, model="tiny-decoder"), _decoder(2, vocab=50))
    student = build_student(StudentSection(keep_layers=None, model="tiny-decoder"), _decoder(2, vocab=256))
    assert student.training and student.config.n_layers == 2


# --- the pseudo-label cache -------------------------------------------------------------------
def test_pseudo_labels_resume_after_a_kill_and_refuse_another_teacher(tiny_model_dir, tmp_path, monkeypatch):
    model, tokenizer = lmlab.load_model(tiny_model_dir), lmlab.load_tokenizer(tiny_model_dir)
    recipe = Recipe(template="instruction", instruction=None, chat=False, prompt_field="dialogue",
                    response_field="summary")
    inputs = [(d.id, d.dialogue) for d in load_dialogues().records[:5]]
    sig = {"teacher": "tiny"}
    whole = pseudo_labels.generate_pseudo_labels(model, tokenizer, recipe, inputs, tmp_path / "whole.jsonl", sig,
                                                 batch_size=2, max_new_tokens=4, echo=None, progress=False)
    assert len(whole) == 5

    import lmlab.generation as generation

    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda m, t, prompts, c: calls.append(len(prompts)) or real(m, t, prompts, c))
    path = tmp_path / "cache.jsonl"
    pseudo_labels.generate_pseudo_labels(model, tokenizer, recipe, inputs, path, sig, batch_size=2, max_new_tokens=4,
                                         echo=None, progress=False, stop_after=2)
    assert calls == [2] and len(path.read_text().splitlines()) == 1 + 2  # signature + 2 rows
    with open(path, "a") as f:  # killed while writing the next row
        f.write('{"key": "abc", "id": "x", "summ')
    calls.clear()
    resumed = pseudo_labels.generate_pseudo_labels(model, tokenizer, recipe, inputs, path, sig, batch_size=2,
                                                   max_new_tokens=4, echo=None, progress=False)
    assert sum(calls) == 3  # only the three missing inputs were generated
    assert resumed == whole  # greedy: the same labels as one uninterrupted run
    assert len(path.read_text().splitlines()) == 1 + 5
    with pytest.raises(ConfigError, match="another teacher or prompt .*differs in: teacher"):
        pseudo_labels.generate_pseudo_labels(model, tokenizer, recipe, inputs, path, {"teacher": "other"},
                                             echo=None, progress=False)


# --- the evaluation-range guard ---------------------------------------------------------------
def _dev_file(directory: Path, n: int = 12) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dev.jsonl"
    path.write_text("".join(json.dumps({"fname": f"dev_{i}", "dialogue": f"#Person1#: line {i}", "summary": "s"}) + "\n"
                            for i in range(n)))
    return path


def test_training_on_held_out_records_is_refused(tmp_path):
    dev = _dev_file(tmp_path / "d")
    holdout = {"path": "dev.jsonl", "records": "8:12"}
    check_holdout([{"path": str(dev), "records": "0:8"}], holdout, "dialogue")  # outside the range: fine
    with pytest.raises(DataError, match=r"records all include 4 held-out evaluation records \(8..11"):
        check_holdout([{"path": str(dev), "records": None}], holdout, "dialogue")
    with pytest.raises(DataError, match="records 5:10 include 2 held-out"):
        check_holdout([{"path": str(dev), "records": "5:10"}], holdout, "dialogue")
    # the same dialogue copied into a file with another name is caught by its text
    copy = tmp_path / "mine.jsonl"
    copy.write_text(dev.read_text().splitlines()[9] + "\n")
    with pytest.raises(DataError, match="mine.jsonl' holds 1 dialogue\\(s\\) of the held-out"):
        check_holdout([{"path": str(dev), "records": "0:8"}, {"path": str(copy)}], holdout, "dialogue")
    check_holdout([{"path": str(dev), "records": None}], None, "dialogue")  # data.holdout: null turns it off


def test_the_guard_reads_a_file_edited_since_its_last_check(tmp_path):
    # a long-lived process (a notebook) checks, the user edits a training file, the process checks again
    dev = _dev_file(tmp_path / "d")
    holdout = {"path": str(dev), "records": "8:12"}
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"dialogue": "#Person1#: something else"}) + "\n")
    check_holdout([{"path": str(mine)}], holdout, "dialogue")
    mine.write_text(dev.read_text().splitlines()[10] + "\n")  # now a held-out dialogue
    with pytest.raises(DataError, match="mine.jsonl' holds 1 dialogue"):
        check_holdout([{"path": str(mine)}], holdout, "dialogue")


def test_the_default_guard_keeps_dialogsum_dev_400_to_500_out(tmp_path):
    dev = _dev_file(tmp_path / "d", n=500)
    cfg = load_distill_config(None, [f"data.train=[{{path: {dev}}}]", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="include 100 held-out evaluation records \\(400..499"):
        distill(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


# --- end to end -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sequence", "token", "token-all"])
def test_cli_distills_a_tiny_teacher_into_a_one_layer_student(tiny_model_dir, dialogues, tmp_path, capsys, method):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(tiny_model_dir), "--no-teacher-adapter", "--keep-layers", "1",
            "--method", method.split("-")[0], "--data", f"{dialogues}:0:6", "--steps", "3", "--batch-size", "2", "--lr", "1e-3",
            "--out", str(out), "--no-progress", "--device", "cpu", "--set", "pseudo.max_new_tokens=6",
            "--set", "data.max_seq_len=384"]
    if method == "token":  # human labels on three records, teacher summaries on three without one
        unlabeled = tmp_path / "unlabeled.jsonl"
        unlabeled.write_text("".join(json.dumps({"dialogue": json.loads(line)["dialogue"]}) + "\n"
                                     for line in dialogues.read_text().splitlines()[10:13]))
        args += ["--label-field", "summary", "--data", f"{dialogues}:0:3", str(unlabeled)]
    if method == "token-all":  # KL on every position; the teacher's summaries count as hard labels too
        args += ["--set", "token.positions=all", "--set", "token.hard_pseudo_labels=true"]
    assert main(args) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "1-layer student" in text
    student = lmlab.load_model(out / "final")
    teacher = lmlab.load_model(tiny_model_dir)
    assert student.config.n_layers == 1 and teacher.config.n_layers == 2
    assert Recipe.load(out / "final") is not None  # lmlab lab/summarize build the teacher's prompt for it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["student_layers"] == 1
    rows = [json.loads(line) for line in (out / "pseudo_labels.jsonl").read_text().splitlines()[1:]]
    expected = 3 if method == "token" else 6  # token with labels: only the unlabeled records need the teacher
    assert len(rows) == expected
    hard_rows = {"sequence": 0, "token": 3, "token-all": 6}[method]  # human labels, or every row when asked
    assert summary["hard_label_rows"] == hard_rows
    assert summary["human_labels"] == (3 if method == "token" else 0)
    # the student was trained: its weights moved away from the teacher's layer 1
    assert not torch.equal(student.decoder.layers[0].attn.q.weight, teacher.decoder.layers[1].attn.q.weight)


def test_summarize_and_serve_prompt_a_distilled_model_with_its_recipe(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    Recipe(template="instruction", instruction="Condense this chat, please.", chat=False, prompt_field="dialogue",
           response_field="summary").save(student)
    assert main(["summarize", "--model", str(student), "#Person1#: Hi.", "--show-prompt", "--max-new-tokens", "2"]) == 0
    assert "Condense this chat, please." in capsys.readouterr().err

    import lmlab.serve

    seen = {}
    monkeypatch.setattr(lmlab.serve, "serve", lambda loader, settings, **kw: seen.update(settings=settings))
    assert main(["serve", str(student), "--port", "8123"]) == 0
    assert seen["settings"].finetuned.instruction == "Condense this chat, please."
    assert main(["serve", str(tiny_model_dir), "--port", "8123"]) == 0  # no recipe: no fine-tuned summarizer
    assert seen["settings"].finetuned is None


def test_the_shipped_distillation_config_is_valid():
    from lmlab.training.distill import validate

    cfg = load_distill_config(Path(__file__).resolve().parents[1] / "configs" / "distill-smollm2-dialogsum.yaml")
    validate(cfg)
    assert cfg.method == "token" and cfg.student.keep_layers == "every-other"
    assert cfg.data.holdout == {"path": "dev.jsonl", "records": "400:500"}
    assert [s.get("records") for s in cfg.data.train] == [None, "0:400"]  # never 400:500


def test_smoothing_and_neftune_reach_sequence_distillation_and_are_refused_for_token(tiny_model_dir, dialogues,
                                                                                     tmp_path, capsys, monkeypatch):
    from lmlab.objectives.sft import SupervisedFineTuning
    from lmlab.training import distill as distill_mod

    seen = []

    class Spy(SupervisedFineTuning):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append((self.label_smoothing, self.neftune_alpha))

    monkeypatch.setattr(distill_mod, "SupervisedFineTuning", Spy)
    args = ["distill", "--teacher", str(tiny_model_dir), "--no-teacher-adapter", "--keep-layers", "1",
            "--data", f"{dialogues}:0:2", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"),
            "--no-progress", "--device", "cpu", "--set", "pseudo.max_new_tokens=4", "--set", "data.max_seq_len=384",
            "--set", "train.neftune_alpha=5", "--set", "train.label_smoothing=0.1"]
    assert main(args + ["--method", "sequence"]) == 0, capsys.readouterr()
    assert seen[-1] == (0.1, 5.0)  # the objective that trained the student
    capsys.readouterr()
    # token distillation learns the teacher's distribution: the settings would do nothing, so they are refused
    assert main(args + ["--method", "token", "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.label_smoothing=0.1" in err and "method=sequence only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tok").exists()
    bad = [a if a != "train.label_smoothing=0.1" else "train.label_smoothing=1.0" for a in args]
    assert main(bad + ["--method", "sequence", "--out", str(tmp_path / "bad")]) == 2
    assert "label_smoothing=1.0 must be in [0, 1)" in capsys.readouterr().err
