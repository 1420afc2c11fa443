"""lmlab.precision: 'auto' follows the hardware's native bf16 support; explicit choices are honoured."""

import pytest
import torch

from lmlab import precision
from lmlab.errors import ConfigError


@pytest.fixture
def native(monkeypatch):
    """Set what the CPU capability probe reports (with no LMLAB_NATIVE_BF16 override in the way)."""
    monkeypatch.delenv("LMLAB_NATIVE_BF16", raising=False)

    def set_native(value: bool):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value, raising=False)
    return set_native


@pytest.mark.parametrize("probe", [True, False])
def test_the_override_takes_either_decision_whatever_the_probe_says(native, monkeypatch, probe):
    native(probe)
    monkeypatch.setenv("LMLAB_NATIVE_BF16", "1")
    assert precision.native_bf16_supported() is True and precision.native_bf16_supported("cuda") is True
    assert precision.resolve_precision("auto", "cpu") is torch.bfloat16
    assert precision.describe_precision("auto") == "bf16 (auto: LMLAB_NATIVE_BF16=1 says this CPU has native bf16)"
    assert precision.describe_precision("bf16") == "bf16 (requested)"
    monkeypatch.setenv("LMLAB_NATIVE_BF16", "0")
    assert precision.native_bf16_supported() is False
    assert precision.resolve_precision("auto", "cpu") is torch.float32
    assert precision.describe_precision("auto") == "fp32 (auto: LMLAB_NATIVE_BF16=0 says this CPU has no native bf16)"
    assert "emulated" in precision.describe_precision("bf16")
    monkeypatch.setenv("LMLAB_NATIVE_BF16", "")  # empty is unset: the probe decides
    assert precision.native_bf16_supported() is probe


@pytest.mark.parametrize("bad", ["yes", "true", "2", "on"])
def test_a_bad_override_is_a_one_line_error_naming_it(native, monkeypatch, bad):
    monkeypatch.setenv("LMLAB_NATIVE_BF16", bad)
    with pytest.raises(ConfigError) as err:
        precision.resolve_precision("auto")
    assert str(err.value) == f"LMLAB_NATIVE_BF16={bad!r} is not valid; choose one of: 0, 1 (or leave it unset)"


@pytest.mark.parametrize("override", ["0", "1"])
def test_a_quantized_model_keeps_fp32_activations_on_either_class(monkeypatch, override):
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.quant import quantize_model

    monkeypatch.setenv("LMLAB_NATIVE_BF16", override)
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    quantize_model(model, 8)
    floats = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    line = precision.apply_precision(model, "auto")
    assert line.startswith("fp32 activations around quantized weights (") and line.endswith("--precision is not used")
    assert {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()} == floats
    with pytest.raises(ConfigError, match="precision='fp8'"):  # still validated
        precision.apply_precision(model, "fp8")


def test_auto_picks_bf16_only_where_native(native):
    native(True)
    assert precision.native_bf16_supported() is True
    assert precision.resolve_precision("auto", "cpu") is torch.bfloat16
    assert precision.describe_precision("auto", "cpu") == "bf16 (auto: this CPU has native bf16)"
    native(False)
    assert precision.native_bf16_supported("cpu") is False
    assert precision.resolve_precision("auto", "cpu") is torch.float32
    assert precision.describe_precision("auto") == "fp32 (auto: this CPU has no native bf16)"


@pytest.mark.parametrize("is_native", [True, False])
def test_explicit_choices_are_honoured(native, is_native):
    native(is_native)
    assert precision.resolve_precision("fp32", "cpu") is torch.float32
    assert precision.resolve_precision("bf16", "cpu") is torch.bfloat16
    text = precision.describe_precision("bf16", "cpu")
    assert text.startswith("bf16 (requested")
    assert ("slower" in text) is (not is_native)


def test_failing_probe_means_not_native(monkeypatch):
    def broken():
        raise RuntimeError("no oneDNN")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken, raising=False)
    assert precision.resolve_precision("auto") is torch.float32


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", "float32"])
def test_unknown_precision_is_a_one_line_config_error(bad):
    with pytest.raises(ConfigError) as err:
        precision.resolve_precision(bad, "cpu")
    message = str(err.value)
    assert repr(bad) in message and "\n" not in message
    assert "auto" in message and "fp32" in message and "bf16" in message


def test_apply_precision_casts_parameters_but_keeps_rope_frequencies_fp32(native):
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer

    model = Transformer(ModelConfig.from_name("tiny-decoder", positional="rope"))
    native(False)
    assert precision.apply_precision(model, "auto") == "fp32 (auto: this CPU has no native bf16)"
    assert model.dtype is torch.float32
    native(True)
    assert precision.apply_precision(model, "auto") == "bf16 (auto: this CPU has native bf16)"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.decoder.rotary.inv_freq.dtype is torch.float32
    assert model.new_cache(1, 4).layers[0].k.dtype is torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="precision='fp8'"):
        precision.apply_precision(model, "fp8")


@pytest.mark.parametrize("is_native,expected", [(True, "bf16 (auto: this CPU has native bf16)"),
                                                (False, "fp32 (auto: this CPU has no native bf16)")])
def test_info_says_which_path_this_machine_takes(native, is_native, expected, tmp_path, capsys):
    import json

    from lmlab.checkpoints import save_model
    from lmlab.cli import main
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer

    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "m")
    native(is_native)
    assert main(["info", str(tmp_path / "m")]) == 0
    assert f"precision on this machine: {expected}\n" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision_auto"] == expected


def test_generate_takes_the_precision_flag_and_says_which_path(native, tmp_path, capsys):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from lmlab.checkpoints import save_model
    from lmlab.cli import main
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.tokenizer import Tokenizer

    backend = Backend(models.WordLevel(vocab={f"w{i}": i for i in range(256)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    save_model(Transformer(ModelConfig.from_name("tiny-decoder")), tmp_path / "m", Tokenizer(backend, {"eos": "w1"}))
    native(False)
    for flag, expected in ((["--precision", "bf16"], "bf16 (requested; this CPU has no native bf16"),
                           ([], "fp32 (auto: this CPU has no native bf16)")):
        assert main(["generate", str(tmp_path / "m"), "w3 w4", "--max-new-tokens", "2", *flag]) == 0
        assert f"precision: {expected}" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "m"), "w3", "--precision", "fp16"]) == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_lab_says_which_precision_and_keeps_bf16_rows_apart(native, tiny_model_dir, tmp_path):
    from lmlab.tasks.summarize.lab import LabSettings, run_lab

    native(False)
    lines: list[str] = []
    settings = LabSettings(model=str(tiny_model_dir), experiments="zero-shot-bare", limit=2, max_new_tokens=3,
                           out=tmp_path / "out", examples=0, precision="bf16")
    run_lab(settings, echo=lines.append, progress=False)
    assert any(line.startswith("precision: bf16 (requested; this CPU has no native bf16") for line in lines)
    settings.precision = "fp32"  # rows generated in bf16 are not resumed as fp32 rows
    with pytest.raises(ConfigError, match="precision"):
        run_lab(settings, echo=lines.append, progress=False)
