"""lmlab.precision: 'auto' follows the hardware's native bf16 support; explicit choices are honoured."""

import pytest
import torch

from lmlab import precision
from lmlab.errors import ConfigError


@pytest.fixture
def native(monkeypatch):
    """Set what the CPU capability probe reports."""
    def set_native(value: bool):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value, raising=False)
    return set_native


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
