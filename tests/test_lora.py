"""LoRA: the layer, apply/merge/disable, PEFT-format adapters both ways against `peft` + `transformers`."""

import json

import pytest
import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from parity import TOL, perturb
from lmlab.adapt import LoraConfig, LoRALinear, apply_lora, load_adapter, lora_disabled, merge_lora, save_adapter
from lmlab.checkpoints import export_hf, load_model
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.model import Transformer


def _tiny_llama(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                                vocab_size=128, tie_embeddings=tie)
    return perturb(Transformer(cfg).eval())


@torch.no_grad()
def _randomize_adapters(model, std=0.2):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, std)


def test_fresh_adapter_leaves_the_model_unchanged_and_trains_only_a_and_b():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    before = model(ids)
    original = model.decoder.layers[0].attn.q.weight  # the nn.Linear's own Parameter, before the swap
    n_before = sum(p.numel() for p in model.parameters())
    report = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="q,v,down"))
    assert len(report.replaced) == 6 and all(isinstance(model.get_submodule(n), LoRALinear) for n in report.replaced)
    assert torch.equal(model(ids), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    # the base weight is the original tensor: held, not copied (the very Parameter object and its storage,
    # frozen), and the model grew by the adapters' A and B only, not by a second copy of any base weight
    held = [p for p in model.decoder.layers[0].attn.q.parameters() if p is original]
    assert len(held) == 1 and held[0].data_ptr() == original.data_ptr() and original.requires_grad is False
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == n_before + adapters
    layer = model.decoder.layers[0].attn.q
    assert layer.get_base_layer() is layer.base_layer and layer.base_layer.weight is original
    assert layer.weight is original


@pytest.mark.parametrize("rslora,expected", [(False, 8 / 4), (True, 8 / 2)])  # alpha / r, alpha / sqrt(r)
def test_the_layer_and_the_config_share_one_scaling(rslora, expected):
    config = LoraConfig(r=4, alpha=8, dropout=0.0, targets="q", rslora=rslora)
    model = _tiny_llama()
    apply_lora(model, config)
    layer = model.decoder.layers[0].attn.q
    assert config.scaling == layer.scaling == expected
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 64)
    update = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T  # (3, O), unscaled
    torch.testing.assert_close(layer(x), layer.base_layer(x) + expected * update)


def test_gradient_reaches_only_the_adapters_and_changes_the_output():
    model = _tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # A gets no gradient while B is zero only through B; B's gradient is non-zero
    assert model.decoder.layers[0].ffn.down.lora_B.weight.grad.abs().sum() > 0


def test_scaling_rslora_and_merge_and_disable():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    base = model(ids)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="q,o,up", rslora=True))
    assert model.decoder.layers[0].attn.q.scaling == pytest.approx(8 / 2)  # alpha / sqrt(r)
    _randomize_adapters(model)
    adapted = model(ids)
    assert (adapted - base).abs().max() > 1e-3
    with lora_disabled(model):
        assert torch.allclose(model(ids), base, atol=1e-6)
    merged = merge_lora(model)
    assert len(merged) == 6 and not any(isinstance(m, LoRALinear) for m in model.modules())
    # fp32 merge: W + s*BA vs W x + s*B(A x) differ by rounding only (|logits| ~ 1, depth ~ 2 layers)
    assert (model(ids) - adapted).abs().max() < 1e-4


def test_bad_targets_and_config_name_the_value():
    model = _tiny_llama()
    with pytest.raises(ConfigError, match=r"'qq' matches no linear layer; available: .*down.*gate.*q"):
        apply_lora(model, LoraConfig(targets="qq"))
    with pytest.raises(ConfigError, match="r=0"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        LoraConfig(dropout=1.5)


@torch.no_grad()
def test_lmlab_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model = _tiny_llama()
    export_hf(model, tmp_path / "base")
    apply_lora(model, LoraConfig(r=4, alpha=16, dropout=0.0, targets="q,k,v,o,gate,up,down"))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", LoraConfig(r=4, alpha=16, dropout=0.0), base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 11))
    ours, ref = model(ids), peft_model(input_ids=ids).logits
    assert (ours - ref).abs().max() <= TOL
    with peft_model.disable_adapter():
        assert (ours - peft_model(input_ids=ids).logits).abs().max() > 100 * TOL  # the adapter matters


@torch.no_grad()
def test_peft_adapter_loads_in_lmlab_with_the_same_logits(tmp_path):
    model = _tiny_llama(tie=False)
    export_hf(model, tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = get_peft_model(hf, PeftLoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                                                   target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ours = load_model(tmp_path / "base", adapter=tmp_path / "peft-adapter")
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 6
    ids = torch.randint(0, 128, (2, 11))
    ref = peft_model.eval()(input_ids=ids).logits
    assert (ours(ids) - ref).abs().max() <= TOL


@torch.no_grad()
def test_t5_adapter_round_trips_through_peft(tmp_path):
    torch.manual_seed(0)
    model = perturb(Transformer(ModelConfig.from_name("t5-small", n_layers=2, n_decoder_layers=2, vocab_size=128)).eval())
    export_hf(model, tmp_path / "base")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="q,v"))
    _randomize_adapters(model, std=0.05)
    save_adapter(model, tmp_path / "adapter", LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v")))
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids, dec = torch.randint(0, 128, (2, 9)), torch.randint(0, 128, (2, 5))
    ref = peft_model(input_ids=ids, decoder_input_ids=dec).logits
    assert (model(ids, decoder_input_ids=dec) - ref).abs().max() <= TOL
    reloaded = load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    assert (reloaded(ids, decoder_input_ids=dec) - ref).abs().max() <= TOL


def test_adapter_for_another_base_names_the_module_and_shapes(tmp_path):
    model = _tiny_llama()
    apply_lora(model, LoraConfig(r=4, targets="q"))
    save_adapter(model, tmp_path / "adapter", LoraConfig(r=4, targets=("q",)))
    torch.manual_seed(0)
    other = Transformer(ModelConfig.from_name("smollm2-135m", n_layers=2, d_model=96, n_heads=4, n_kv_heads=2,
                                              head_dim=24, d_ff=128, vocab_size=128))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.attn\.q.*\(4, 64\).*\(4, 96\)"):
        load_adapter(other, tmp_path / "adapter")
    deeper = Transformer(ModelConfig.from_name("smollm2-135m", n_layers=1, d_model=64, n_heads=4, n_kv_heads=2,
                                               head_dim=16, d_ff=128, vocab_size=128))
    with pytest.raises(CheckpointError, match="layers.1.self_attn.q_proj"):
        load_adapter(deeper, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(other, tmp_path)


def test_a_registry_base_is_recorded_by_its_hub_id(tmp_path):
    model = _tiny_llama()
    apply_lora(model, LoraConfig(r=2, targets="q"))
    save_adapter(model, tmp_path / "a", LoraConfig(r=2, targets=("q",)), base_model="smollm2-135m-instruct")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
