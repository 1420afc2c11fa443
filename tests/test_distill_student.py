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


def test_a_lora_student_resumes_exactly(tiny_model_dir, teacher_adapter, dialogues, tmp_path):
    data = [{"path": str(dialogues), "records": "0:6"}]
    distill(_config(tiny_model_dir, teacher_adapter, data, tmp_path / "a"), show_progress=False)
    first = distill(_config(tiny_model_dir, teacher_adapter, data, tmp_path / "b", train__stop_after=2),
                    show_progress=False)
    assert first["step"] == 2 and not (tmp_path / "b" / "final").exists()
    distill(_config(tiny_model_dir, teacher_adapter, data, tmp_path / "b"), resume=True, show_progress=False)
    whole = load_file(str(tmp_path / "a" / "final" / WEIGHTS_FILE))
    resumed = load_file(str(tmp_path / "b" / "final" / WEIGHTS_FILE))
    assert sorted(whole) == sorted(resumed)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # bit for bit, as lmlab finetune resumes


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


# --- plugging the student in: shipped bundles, load_model, summarize, serve, the lab ------------
@pytest.fixture(scope="module")
def bundle(tiny_model_dir, teacher_adapter, dialogues, tmp_path_factory) -> Path:
    """A student bundle of the tiny teacher (layer 1 kept, the teacher's adapter, a trained student adapter),
    with a recipe whose instruction is its own (so tests can tell its prompt apart)."""
    out = tmp_path_factory.mktemp("bundle") / "run"
    distill(_config(tiny_model_dir, teacher_adapter, [{"path": str(dialogues), "records": "0:4"}], out,
                    train__steps=2), show_progress=False)
    recipe = json.loads((out / "final" / "lmlab_recipe.json").read_text())
    (out / "final" / "lmlab_recipe.json").write_text(json.dumps({**recipe, "instruction": "Condense this chat, please.",
                                                                 "chat": False}))
    return out / "final"


def test_the_shipped_student_is_found_by_model_name(tiny_model_dir, bundle, tmp_path, monkeypatch):
    from lmlab.adapt import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "STUDENTS_DIR", tmp_path / "students")
    monkeypatch.setitem(recipe_module.SHIPPED_STUDENTS, str(tiny_model_dir), "tiny-student")
    assert recipe_module.shipped_student(str(tiny_model_dir)) is None  # not installed yet
    with pytest.raises(ConfigError, match=f"lmlab ships no student for '{tiny_model_dir}'; pass --student DIR"):
        lmlab.load_model(tiny_model_dir, student="shipped")
    shutil.copytree(bundle, tmp_path / "students" / "tiny-student")
    assert recipe_module.shipped_student(str(tiny_model_dir)) == tmp_path / "students" / "tiny-student"
    ids = _ids(lmlab.load_tokenizer(tiny_model_dir).vocab_size)
    with torch.no_grad():
        assert torch.equal(lmlab.load_model(tiny_model_dir, student="shipped")(ids), lmlab.load_model(bundle)(ids))
    assert recipe_module.SHIPPED_STUDENTS["smollm2-135m-instruct"] == "smollm2-135m-instruct-dialogsum-student"


def test_the_package_data_carries_every_file_of_a_shipped_bundle(bundle):
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmlab"]
    files = [p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()]
    assert "teacher_adapter/adapter_model.safetensors" in files and STUDENT_FILE in files
    for f in files + ["README.md"]:
        name = f"students/smollm2-135m-instruct-dialogsum-student/{f}"
        # setuptools globs: "*" does not cross "/"
        assert any(fnmatch.fnmatch(name, p) and name.count("/") == p.count("/") for p in patterns), name


def test_summarize_with_a_student(tiny_model_dir, bundle, capsys, monkeypatch):
    from lmlab.adapt import recipe as recipe_module
    from lmlab.cli import main

    dialogue = "#Person1#: Hi, how are you?\n#Person2#: Fine, thanks."
    assert main(["summarize", "--student", str(bundle), dialogue, "--show-prompt", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "distilled student" in err and "Condense this chat, please." in err  # the bundle's recipe
    # the same text as the merged student loaded directly (--model DIR reads the bundle and its recipe too)
    assert main(["summarize", "--model", str(bundle), dialogue, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == out
    assert main(["summarize", "--model", str(tiny_model_dir), "--student", str(bundle), dialogue,
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == out
    assert main(["summarize", "--student", str(bundle), "--adapter", str(bundle), dialogue]) == 2  # one or the other
    assert "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setattr(recipe_module, "SHIPPED_STUDENTS", {})
    assert main(["summarize", dialogue, "--student"]) == 2
    assert "lmlab ships no student for 'smollm2-135m-instruct'; pass --student DIR" in capsys.readouterr().err


def test_serve_a_student(tiny_model_dir, bundle, monkeypatch, capsys):
    import lmlab.serve
    from lmlab.cli import main

    seen = {}
    monkeypatch.setattr(lmlab.serve, "serve", lambda loader, settings, **kw: seen.update(settings=settings,
                                                                                         loaded=loader()))
    ids = _ids(lmlab.load_tokenizer(tiny_model_dir).vocab_size)
    with torch.no_grad():
        want = lmlab.load_model(bundle)(ids)
    for args in (["--student", str(bundle)], [str(tiny_model_dir), "--student", str(bundle)]):
        assert main(["serve", *args, "--port", "8123"]) == 0, capsys.readouterr()
        settings, (model, tokenizer) = seen["settings"], seen["loaded"]
        assert settings.model_name.endswith(f"+student:{bundle.parent.name}/final") and "student" in capsys.readouterr().out
        assert settings.finetuned.instruction == "Condense this chat, please."
        with torch.no_grad():
            assert torch.allclose(model(ids), want) and model.config.n_layers == 1
        assert tokenizer.eos_token_id == lmlab.load_tokenizer(tiny_model_dir).eos_token_id  # the base's
    assert main(["serve", "--student", "--port", "8123"]) == 2
    assert "give MODEL" in capsys.readouterr().err
    assert main(["serve", str(tiny_model_dir), "--student", str(tiny_model_dir), "--port", "8123"]) == 2
    assert f"has no {STUDENT_FILE}" in capsys.readouterr().err


def test_lab_runs_finetuned_and_student_in_one_run(tiny_model_dir, teacher_adapter, bundle, tmp_path, capsys,
                                                   monkeypatch):
    from lmlab.tasks.summarize import lab as lab_mod

    used, real = [], lab_mod._generate
    monkeypatch.setattr(lab_mod, "_generate", lambda m, t, prompts, c: used.append((m.config.n_layers, len(prompts)))
                        or real(m, t, prompts, c))
    from lmlab.adapt.recipe import Recipe
    from lmlab.cli import main
    from lmlab.generation import generate
    from lmlab.tasks.summarize.experiments import generation_config, parse_experiments

    out = tmp_path / "lab"
    args = ["lab", "--model", str(tiny_model_dir), "--experiments", "finetuned,student", "--adapter",
            str(teacher_adapter), "--student", str(bundle), "--limit", "3", "--max-new-tokens", "6",
            "--precision", "fp32", "--no-turns", "--out", str(out), "--examples", "0"]
    assert main(args) == 0, capsys.readouterr().err
    assert "student:" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["experiment"] for r in rows) == ["finetuned"] * 3 + ["student"] * 3
    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    recipe = Recipe.load(bundle)
    dialogues = {d.id: d.dialogue for d in load_dialogues().records}
    models = {"student": lmlab.load_model(bundle), "finetuned": lmlab.load_model(tiny_model_dir, adapter=teacher_adapter)}
    for name in ("student", "finetuned"):
        mine = [r for r in rows if r["experiment"] == name]
        if name == "student":  # the prompt the student was distilled with
            assert all(r["prompt"] == recipe.prompt(dialogues[r["id"]], tokenizer).text for r in mine)
        config = generation_config(parse_experiments(name)[0], 6, 0, False)
        assert [r["output"] for r in mine] == generate(models[name], tokenizer, [r["prompt"] for r in mine], config)
    # which model wrote which rows (tiny random models may write the same text): 2 layers, then the 1-layer student
    assert used == [(2, 3), (1, 3)]
    # resume: nothing to redo; a changed student is another experiment definition, refused
    assert main(args) == 0 and "0 new row(s)" in capsys.readouterr().out
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    tensors = load_file(str(changed / WEIGHTS_FILE))
    save_file({k: v * 2 for k, v in tensors.items()}, str(changed / WEIGHTS_FILE))
    assert main([a if a != str(bundle) else str(changed) for a in args]) == 2
    assert "'student' rows from an earlier definition" in capsys.readouterr().err


def test_lab_student_needs_a_bundle(tiny_model_dir, tmp_path):
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    with pytest.raises(ConfigError, match=f"lmlab ships no student for '{tiny_model_dir}'; pass --student DIR"):
        run_lab(LabSettings(model=str(tiny_model_dir), experiments="student", out=tmp_path), echo=lambda t: None)
    with pytest.raises(CheckpointError, match=f"has no {STUDENT_FILE}"):
        run_lab(LabSettings(model=str(tiny_model_dir), experiments="student", student=str(tiny_model_dir),
                            out=tmp_path), echo=lambda t: None)


def test_the_shipped_student_config_is_valid():
    from lmlab.training.distill import load_distill_config, student_lora

    cfg = load_distill_config(Path(__file__).resolve().parents[1] / "configs" / "distill-smollm2-dialogsum-student.yaml")
    validate(cfg)
    assert cfg.method == "sequence" and cfg.data.label_field == "summary" and cfg.pseudo.label_labeled
    assert student_lora(cfg.student).r == 64 and cfg.student.model is None
    assert [s.get("records") for s in cfg.data.train] == ["0:400", None]  # never 400:500


def test_the_student_keeps_the_teachers_prompt_but_not_its_mbr(tiny_model_dir, teacher_adapter, dialogues, tmp_path):
    """A teacher recipe that decodes by minimum Bayes risk (the shipped adapter's) hands the student its prompt
    only: the student's decoding is measured on its own."""
    from lmlab.adapt.recipe import Recipe
    from lmlab.tasks.summarize.experiments import INSTRUCTION

    adapter = tmp_path / "teacher"
    shutil.copytree(teacher_adapter, adapter)
    Recipe(template="instruction", instruction=INSTRUCTION, chat=False, prompt_field="dialogue",
           response_field="summary", mbr={"n": 8, "temperature": 0.7}).save(adapter)
    distill(_config(tiny_model_dir, adapter, [{"path": str(dialogues), "records": "0:4"}], tmp_path / "run"),
            show_progress=False)
    student = Recipe.load(tmp_path / "run" / "final")
    assert student.mbr == {} and student.instruction == INSTRUCTION and student.chat is False
