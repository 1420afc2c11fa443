"""Every command and library function that writes a model directory follows the output rules
(docs/checkpoints.md): never the source, never a directory lmlab did not write, an earlier lmlab output
only with --force, and a marker saying what wrote it."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.adapt.lora import LoraConfig, apply_lora
from lmlab.adapt.peft import save_adapter
from lmlab.checkpoints import MARKER_FILE, atomic_dir, check_output, export_hf, save_model
from lmlab.checkpoints import families
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.model import Transformer

SRC = Path(__file__).resolve().parent.parent / "src" / "lmlab"


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes): what must survive a refused write."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Temporary or backup directories a writer left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def tiny(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny float model (the session fixture must not be put at risk)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))


@pytest.fixture()
def adapter(tiny, tmp_path) -> Path:
    model = lmlab.load_model(tiny)
    config = LoraConfig(r=2, targets=("q", "v"))
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return save_adapter(model, tmp_path / "adapter", config)


# --- a directory lmlab did not write ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["quantize", "merge", "export", "merge-hf"])
def test_a_directory_lmlab_did_not_write_is_refused_and_kept(tiny, adapter, tmp_path, capsys, command):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("a user's notes")
    before = _snapshot(victim)
    argv = {"quantize": ["quantize", str(tiny), str(victim), "--bits", "8"],
            "merge": ["merge", str(tiny), str(adapter), str(victim)],
            "merge-hf": ["merge", str(tiny), str(adapter), str(victim), "--format", "hf"],
            "export": ["export", str(tiny), str(victim)]}[command]
    for force in ([], ["--force"]):  # --force replaces lmlab's outputs only
        assert main(argv + force) == 2
        err = _error(capsys)
        assert str(victim) in err and "lmlab did not write" in err
        assert _snapshot(victim) == before
    assert _leftovers(tmp_path) == []


def test_library_writers_refuse_a_foreign_directory_even_with_force(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("{}")  # looks like a checkpoint, but not lmlab's
    for write in (save_model, export_hf):
        with pytest.raises(CheckpointError, match="non-empty directory lmlab did not write"):
            write(model, victim, force=True)
    assert (victim / "config.json").read_text() == "{}" and len(list(victim.iterdir())) == 1


def test_a_file_or_a_link_at_the_output_path_is_refused(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_model(model, tmp_path / "file")
    save_model(model, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CheckpointError, match="symbolic link"):
        save_model(model, tmp_path / "link")
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "real" / "model.safetensors").exists()


def test_an_empty_directory_is_written_into(tmp_path):
    (tmp_path / "empty").mkdir()
    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "empty", force=False)
    assert lmlab.load_model(tmp_path / "empty").config.arch == "decoder"


# --- the source -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["quantize-self", "quantize-inside", "quantize-parent", "merge-base",
                                  "merge-adapter", "merge-inside-adapter", "export-self", "export-inside"])
def test_a_writer_never_writes_over_its_source(tiny, adapter, tmp_path, capsys, case):
    # the source is an lmlab checkpoint, so even --force must not replace it
    argv, what = {
        "quantize-self": (["quantize", str(tiny), str(tiny), "--bits", "8"], "is the source"),
        "quantize-inside": (["quantize", str(tiny), str(tiny / "q8"), "--bits", "8"], "inside the source"),
        "quantize-parent": (["quantize", str(tiny), str(tmp_path), "--bits", "8"], "contains the source"),
        "merge-base": (["merge", str(tiny), str(adapter), str(tiny)], "is the source"),
        "merge-adapter": (["merge", str(tiny), str(adapter), str(adapter)], "is the source"),
        "merge-inside-adapter": (["merge", str(tiny), str(adapter), str(adapter / "m")], "inside the source"),
        "export-self": (["export", str(tiny), str(tiny)], "is the source"),
        "export-inside": (["export", str(tiny), str(tiny / "hf")], "inside the source"),
    }[case]
    out = argv[2] if argv[0] != "merge" else argv[3]
    model, adapted = _snapshot(tiny), _snapshot(adapter)
    assert main(argv + ["--force"]) == 2
    err = _error(capsys)
    assert what in err and f"output {out!r}" in err
    assert _snapshot(tiny) == model and _snapshot(adapter) == adapted


def test_the_source_is_refused_before_the_model_is_loaded(tiny, monkeypatch, capsys):
    import lmlab.quant.checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(lmlab.quant.checkpoint, "load_model", never)
    assert main(["quantize", str(tiny), str(tiny), "--bits", "8"]) == 2
    assert "is the source" in _error(capsys)


def test_quantize_refuses_an_already_quantized_source(tiny, tmp_path, capsys):
    assert main(["quantize", str(tiny), str(tmp_path / "q8"), "--bits", "8"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "q8"), str(tmp_path / "q4"), "--bits", "4"]) == 2
    err = _error(capsys)
    assert "already quantized" in err and "int8" in err and str(tmp_path / "q8") in err
    assert not (tmp_path / "q4").exists()


# --- an earlier lmlab output: --force --------------------------------------------------------------
def test_quantize_replaces_its_earlier_output_only_with_force(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), str(out), "--bits", "8"]) == 0
    capsys.readouterr()
    int8 = _snapshot(out)
    assert main(["quantize", str(tiny), str(out), "--bits", "4"]) == 2
    err = _error(capsys)
    assert str(out) in err and "--force" in err and "lmlab quantize" in err
    assert _snapshot(out) == int8
    assert main(["quantize", str(tiny), str(out), "--bits", "4", "--force"]) == 0
    layers = json.loads((out / "quantization.json").read_text())["layers"]
    assert {spec["bits"] for spec in layers.values()} == {4}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["merge", "merge-hf", "export"])
def test_merge_and_export_replace_their_earlier_output_only_with_force(tiny, adapter, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"merge": ["merge", str(tiny), str(adapter), str(out)],
            "merge-hf": ["merge", str(tiny), str(adapter), str(out), "--format", "hf"],
            "export": ["export", str(tiny), str(out)]}[command]
    assert main(argv) == 0
    capsys.readouterr()
    (out / "model.safetensors").write_bytes(b"stale")  # tell the earlier output from the new one
    assert main(argv) == 2 and "--force" in _error(capsys)
    assert (out / "model.safetensors").read_bytes() == b"stale"
    assert main(argv + ["--force"]) == 0
    assert lmlab.load_model(out).config.vocab_size == lmlab.load_model(tiny).config.vocab_size
    assert _leftovers(tmp_path) == []


def test_save_model_replaces_an_earlier_save_as_training_jobs_need(tmp_path):
    # a training job re-saves best/ each time the metric improves, also after a resume in a new process
    first, second = (Transformer(ModelConfig.from_name(n)) for n in ("tiny-decoder", "tiny-encoder"))
    save_model(first, tmp_path / "best")
    (tmp_path / "best" / "lmlab_recipe.json").write_text("{}")  # what the job adds after the save
    save_model(second, tmp_path / "best")
    assert lmlab.load_model(tmp_path / "best").config.arch == "encoder"
    with pytest.raises(CheckpointError, match="pass --force"):
        save_model(first, tmp_path / "best", force=False)
    assert lmlab.load_model(tmp_path / "best").config.arch == "encoder"


def test_a_checkpoint_from_before_the_marker_counts_as_lmlab_output(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    save_model(model, tmp_path / "old")
    (tmp_path / "old" / MARKER_FILE).unlink()  # as lmlab < the marker wrote it: config.json has lmlab_format
    with pytest.raises(CheckpointError, match="holds an lmlab checkpoint; pass --force"):
        save_model(model, tmp_path / "old", force=False)
    save_model(model, tmp_path / "old", force=True)
    assert (tmp_path / "old" / MARKER_FILE).exists()


def test_a_failed_write_keeps_the_earlier_output(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    save_model(model, tmp_path / "out")
    before = _snapshot(tmp_path / "out")

    def fail(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(tmp_path / "out", fail, what="test", force=True)
    assert _snapshot(tmp_path / "out") == before and _leftovers(tmp_path) == []


# --- the marker -----------------------------------------------------------------------------------
def test_every_writer_leaves_a_marker_saying_what_wrote_it(tiny, adapter, tmp_path, capsys):
    start = time.time()
    assert main(["quantize", str(tiny), str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert main(["merge", str(tiny), str(adapter), str(tmp_path / "merged")]) == 0
    assert main(["export", str(tiny), str(tmp_path / "hf")]) == 0
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    save_model(model, tmp_path / "saved")
    export_hf(model, tmp_path / "exported")
    expected = {"q8": ("quantize", [tiny]), "merged": ("merge", [tiny, adapter]), "hf": ("export", [tiny]),
                "saved": ("save_model", []), "exported": ("export_hf", [])}
    for name, (what, sources) in expected.items():
        marker = json.loads((tmp_path / name / MARKER_FILE).read_text())
        assert marker["writer"] == "lmlab" and marker["lmlab_version"] == lmlab.__version__
        assert marker["what"] == what
        assert [Path(s).resolve() for s in marker["sources"]] == [Path(s).resolve() for s in sources]
        written = time.mktime(time.strptime(marker["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert start - 2 <= written <= time.time() + 2
    # the marker does not get in the way of the format's own reader
    transformers = pytest.importorskip("transformers")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.vocab_size == lmlab.load_model(tiny).config.vocab_size


def test_check_output_names_the_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(CheckpointError) as info:
        check_output(tmp_path / "d")
    assert str(tmp_path / "d") in str(info.value) and "\n" not in str(info.value)


# --- the shape of the package ---------------------------------------------------------------------
def test_no_import_circle_whichever_module_comes_first():
    """Each of these imported first in a fresh interpreter (a circle fails only for some orders)."""
    modules = ["lmlab.quant.model", "lmlab.quant.gguf", "lmlab.quant", "lmlab.checkpoints.native",
               "lmlab.checkpoints.hf", "lmlab.checkpoints.hf_t5", "lmlab.checkpoints.save", "lmlab.checkpoints.load",
               "lmlab.adapt.merge", "lmlab.quant.checkpoint", "lmlab.precision", "lmlab.adapt.peft"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    for m in [m for m in sys.modules if m == 'lmlab' or m.startswith('lmlab.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n"
            "    import lmlab.checkpoints as c\n"
            "    assert callable(c.load_model) and callable(c.describe) and callable(c.save_model), name\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_families_register_themselves_and_hf_imports_none_of_them():
    tree = ast.parse((SRC / "checkpoints" / "hf.py").read_text())
    imported = set()  # full names of the modules (and of the names taken from them) hf.py imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    assert "lmlab.checkpoints.families" in imported  # the check sees imports at all
    assert not [name for name in imported if name.startswith("lmlab.checkpoints.hf_")]
    assert [f.MODEL_TYPES[0] for f in families.families()] == ["gpt2", "llama", "bert", "t5"]
    assert families.family_for_model_type("qwen2").__name__ == "lmlab.checkpoints.hf_llama"


def test_a_family_registers_once_and_its_model_types_must_be_new():
    gpt2 = families.family_for_model_type("gpt2")
    assert families.register(gpt2) is gpt2 and len(families.families()) == 4
    clash = types.ModuleType("clash")
    clash.__dict__.update({name: None for name in families.REQUIRED}, MODEL_TYPES=("llama",))
    with pytest.raises(CheckpointError, match="'llama' is already read by lmlab.checkpoints.hf_llama"):
        families.register(clash)
    incomplete = types.ModuleType("incomplete")
    incomplete.MODEL_TYPES = ("new",)
    with pytest.raises(CheckpointError, match="incomplete lacks matches"):
        families.register(incomplete)
    assert len(families.families()) == 4
