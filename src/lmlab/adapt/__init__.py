"""Adapting a pretrained model: LoRA layers, PEFT-format adapters, merging.

* ``lora``  ``LoRALinear``, ``apply_lora`` (swap target linears by name), ``merge_lora``, ``lora_disabled``
* ``peft``  ``save_adapter`` / ``load_adapter`` in PEFT's on-disk format (adapter_config.json +
            adapter_model.safetensors with PEFT's key names)
"""

from lmlab.adapt.lora import LoraConfig, LoRALinear, apply_lora, lora_disabled, lora_state_dict, merge_lora
from lmlab.adapt.peft import load_adapter, save_adapter

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "lora_disabled", "lora_state_dict", "merge_lora",
           "load_adapter", "save_adapter"]
