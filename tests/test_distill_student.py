"""Distilled students with LoRA: the student bundle (write, load, every adapter needed) and sequence KD with labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmlab
from lmlab.adapt.lora import LoraConfig, LoRALinear, apply_lora, lora_modules, merge_lora
from lmlab.adapt.peft import WEIGHTS_FILE, save_adapter
from lmlab.adapt.student import STUDENT_FILE, keep_layers
from lmlab.checkpoints import load_config
from lmlab.errors import CheckpointError, ConfigError
from lmlab.quant.linear import QuantizedLinear
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.training import distill as distill_mod
from lmlab.training.distill import DistillConfig, distill, validate


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "dialogues.jsonl"
    path.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in load_dialogues().records))
    return path


@pytest.fixture(scope="module")
def teacher_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny teacher whose B matrices are not zero (so it changes the teacher)."""
    model = lmlab.load_model(tiny_model_dir)
    torch.manual_seed(1)
    config = LoraConfig(r=4, alpha=8.0, dropout=0.0)
    apply_lora(model, config)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.weight.normal_(0.0, 0.05)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "teacher", config, base_model=str(tiny_model_dir))


def _config(teacher, adapter, data, out, method="sequence", **extra) -> DistillConfig:
    raw = {"teacher": str(teacher), "teacher_adapter": str(adapter) if adapter else None, "method": method,
           "student": {"keep_layers": "1", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
           "data": {"train": data, "max_seq_len": 384},
           "pseudo": {"max_new_tokens": 6},
           "train": {"epochs": None, "steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 2e-2, "warmup_steps": 0, "device": "cpu"},
           "out_dir": str(out)}
    for key, value in extra.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return DistillConfig.from_dict(raw)


def _capture(monkeypatch) -> list:
    """Keep what ``build`` hands to the job (the in-memory student) for comparison after training."""
    built, real = [], distill_mod.build
    monkeypatch.setattr(distill_mod, "build", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    return built


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["sequence", "token"])
def test_lora_student_bundle_reloads_to_the_trained_student(tiny_model_dir, teacher_adapter, dialogues, tmp_path,
                                                            monkeypatch, method):
    built = _capture(monkeypatch)
    summary = distill(_config(tiny_model_dir, teacher_adapter, [{"path": str(dialogues), "records": "0:6"}],
                              tmp_path / "run", method), show_progress=False)
    assert summary["step"] == 3 and summary["student_bundle"] is True
    assert 0 < summary["trainable_parameters"] < summary["student_parameters"]
    final = tmp_path / "run" / "final"
    meta = json.loads((final / STUDENT_FILE).read_text())
    assert meta == {"format": 1, "base_model": str(Path(tiny_model_dir).resolve()), "keep_layers": [1],
                    "teacher_adapter": "teacher_adapter", "student_adapter": "."}
    assert (final / "adapter_config.json").exists() and (final / "lmlab_recipe.json").exists()

    # the teacher's adapter restricted to layer 1, renumbered to 0, tensors and dtype unchanged
    original, restricted = load_file(str(teacher_adapter / WEIGHTS_FILE)), load_file(str(final / "teacher_adapter" / WEIGHTS_FILE))
    expected = {k.replace("layers.1.", "layers.0."): v for k, v in original.items() if "layers.1." in k}
    assert sorted(restricted) == sorted(expected) and expected
    assert all(torch.equal(restricted[k], v) and restricted[k].dtype == v.dtype for k, v in expected.items())

    # only the adapters trained: the student's base weights are the adapter-merged teacher's layer 1
    student = built[0].model
    assert all(isinstance(m, LoRALinear) for _, m in lora_modules(student)) and any(lora_modules(student))
    teacher = lmlab.load_model(tiny_model_dir, adapter=teacher_adapter)
    merge_lora(teacher)
    assert torch.equal(student.decoder.layers[0].attn.q.base_layer.weight, teacher.decoder.layers[1].attn.q.weight)
    assert any(m.lora_B.weight.abs().max() > 0 for _, m in lora_modules(student))  # it moved

    # reloading: base -> layer 1 -> teacher adapter merged -> student adapter merged == the trained student
    ids = _ids(student.config.vocab_size)
    with torch.no_grad():
        want = student.eval()(ids)
        for loaded in (lmlab.load_model(tiny_model_dir, student=final), lmlab.load_model(final)):
            assert not any(lora_modules(loaded)) and not loaded.training and loaded.config.n_layers == 1
            assert torch.allclose(loaded(ids), want, atol=1e-5, rtol=1e-5)
        # quantize= applies after merging
        q = lmlab.load_model(final, quantize="int8")
        assert any(isinstance(m, QuantizedLinear) for m in q.modules())
        assert torch.allclose(q(ids), want, atol=0.05)
    assert lmlab.load_tokenizer(final).eos_token_id == lmlab.load_tokenizer(tiny_model_dir).eos_token_id
    assert load_config(final)[0].n_layers == 1


def test_the_bundle_needs_its_teacher_adapter_and_its_base(tiny_model_dir, teacher_adapter, dialogues, tmp_path):
    distill(_config(tiny_model_dir, teacher_adapter, [{"path": str(dialogues), "records": "0:4"}], tmp_path / "run",
                    train__steps=1), show_progress=False)
    final = tmp_path / "run" / "final"
    ids = _ids(load_config(final)[0].vocab_size)
    with torch.no_grad():
        reference = lmlab.load_model(final)(ids)

    def variant(name, edit):
        copy = tmp_path / name
        shutil.copytree(final, copy)
        edit(copy)
        return copy

    def no_teacher_adapter(d):
        meta = json.loads((d / STUDENT_FILE).read_text())
        (d / STUDENT_FILE).write_text(json.dumps({**meta, "teacher_adapter": None}))

    def doubled(d):
        path = d / "teacher_adapter" / WEIGHTS_FILE
        tensors = load_file(str(path))
        save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, str(path))

    with torch.no_grad():  # the teacher's adapter is part of the student: without it, or changed, other logits
        for d in (variant("plain", no_teacher_adapter), variant("doubled", doubled)):
            assert (lmlab.load_model(d)(ids) - reference).abs().max() > 1e-3
    removed = variant("removed", lambda d: shutil.rmtree(d / "teacher_adapter"))
    with pytest.raises(CheckpointError, match="teacher_adapter='teacher_adapter' is not a directory"):
        lmlab.load_model(removed)
    far = variant("far", lambda d: (d / STUDENT_FILE).write_text(
        (d / STUDENT_FILE).read_text().replace('"keep_layers": [\n    1\n  ]', '"keep_layers": [7]')))
    with pytest.raises(CheckpointError, match=r"keep_layers=\[7\] names layer 7, but .* has layers 0..1"):
        lmlab.load_model(far)
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(CheckpointError, match="was distilled from base_model=.*, not .*other-base"):
        lmlab.load_model(other, student=final)
    with pytest.raises(CheckpointError, match=f"has no {STUDENT_FILE}"):
        lmlab.load_model(tiny_model_dir, student=tmp_path)
    with pytest.raises(CheckpointError, match="cannot be combined"):
        lmlab.load_model(tiny_model_dir, student=final, adapter=teacher_adapter)


def test_a_bundle_without_a_teacher_adapter_and_keep_layers_equal_to_merging(tiny_model_dir, dialogues, tmp_path):
    distill(_config(tiny_model_dir, None, [{"path": str(dialogues), "records": "0:4"}], tmp_path / "run",
                    train__steps=1, student__keep_layers="0,1"), show_progress=False)
    final = tmp_path / "run" / "final"
    meta = json.loads((final / STUDENT_FILE).read_text())
    assert meta["teacher_adapter"] is None and meta["keep_layers"] == [0, 1]
    assert not (final / "teacher_adapter").exists()
    by_hand = lmlab.load_model(tiny_model_dir, adapter=final)
    merge_lora(by_hand)
    by_hand = keep_layers(by_hand, [0, 1])  # 2 of 2 layers: the same model
    ids = _ids(by_hand.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(lmlab.load_model(final)(ids), by_hand(ids), atol=1e-6)


def test_lora_on_another_student_model_saves_a_peft_adapter(tiny_model_dir, dialogues, tmp_path):
    distill(_config(tiny_model_dir, None, [{"path": str(dialogues), "records": "0:4"}], tmp_path / "run",
                    train__steps=1, student__model=str(tiny_model_dir), student__keep_layers=None), show_progress=False)
    final = tmp_path / "run" / "final"
    assert not (final / STUDENT_FILE).exists() and (final / "adapter_config.json").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    model = lmlab.load_model(tiny_model_dir, adapter=final)
    assert any(lora_modules(model))


def test_bad_student_lora_is_one_line(tiny_model_dir, dialogues, tmp_path):
    data = [{"path": str(dialogues)}]
    with pytest.raises(ConfigError, match=r"student\.lora\.r=0"):
        validate(_config(tiny_model_dir, None, data, tmp_path, student__lora={"r": 0}))
    with pytest.raises(ConfigError, match="unknown key.*student.lora.rank"):
        validate(_config(tiny_model_dir, None, data, tmp_path, student__lora={"rank": 4}))
    with pytest.raises(ConfigError, match="student.model='tiny-decoder' is initialised at random"):
        validate(_config(tiny_model_dir, None, data, tmp_path, student__model="tiny-decoder"))


# --- sequence distillation with human labels ----------------------------------------------------
def _unlabeled(dialogues: Path, tmp_path: Path) -> Path:
    path = tmp_path / "unlabeled.jsonl"
    path.write_text("".join(json.dumps({"dialogue": json.loads(line)["dialogue"]}) + "\n"
                            for line in dialogues.read_text().splitlines()[10:12]))
    return path


def _rows(out: Path) -> int:
    return len((out / "pseudo_labels.jsonl").read_text().splitlines()) - 1  # after the signature line


def test_sequence_trains_on_human_labels_and_teacher_summaries_together(tiny_model_dir, dialogues, tmp_path):
    data = [{"path": str(dialogues), "records": "0:4"}, {"path": str(_unlabeled(dialogues, tmp_path))}]
    out = tmp_path / "both"
    s = distill(_config(tiny_model_dir, None, data, out, train__steps=1, data__label_field="summary"),
                show_progress=False)
    assert _rows(out) == 6  # the teacher summarized the 4 labelled and the 2 unlabeled inputs
    assert s["human_labels"] == 4
    assert s["train_pairs"] + s["empty_teacher_summaries"] == 10  # 4 (input, label) + 6 (input, teacher summary)
    assert s["teacher_summaries"] == s["train_pairs"] - 4
    # without label_labeled, only the unlabeled inputs need the teacher
    out = tmp_path / "unlabeled-only"
    s = distill(_config(tiny_model_dir, None, data, out, train__steps=1, data__label_field="summary",
                        pseudo__label_labeled=False), show_progress=False)
    assert _rows(out) == 2 and s["human_labels"] == 4
    assert s["train_pairs"] + s["empty_teacher_summaries"] == 6


def test_shrink_and_fine_tune_never_asks_the_teacher(tiny_model_dir, dialogues, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher generated pseudo-labels")

    monkeypatch.setattr(distill_mod, "generate_pseudo_labels", refuse)
    out = tmp_path / "run"
    s = distill(_config(tiny_model_dir, None, [{"path": str(dialogues), "records": "0:5"}], out, train__steps=2,
                        data__label_field="summary", pseudo__label_labeled=False), show_progress=False)
    assert s["step"] == 2 and s["train_pairs"] == 5 and s["human_labels"] == 5 and s["teacher_summaries"] == 0
    assert not (out / "pseudo_labels.jsonl").exists()
    # the same data with label_labeled (the default) does call the teacher
    with pytest.raises(AssertionError, match="generated pseudo-labels"):
        distill(_config(tiny_model_dir, None, [{"path": str(dialogues), "records": "0:5"}], tmp_path / "r2",
                        train__steps=2, data__label_field="summary"), show_progress=False)
