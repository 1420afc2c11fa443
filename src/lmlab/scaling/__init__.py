"""Back-of-the-envelope scaling: memory for inference and training, and Chinchilla compute-optimal plans.

Everything here is arithmetic on a ``ModelConfig`` (no torch, no weights), so `lmlab plan` answers
"does it fit?" and "how big, how long?" before anything is allocated.

Notation (used in every formula below): N parameters, D training tokens, C training FLOPs,
b batch size, s sequence length, h d_model, a attention heads, L layers, V vocabulary, f d_ff,
q = n_heads * head_dim (query width), k = n_kv_heads * head_dim (key/value width), p bytes per element.

Sources
* Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), section 4.1: a GPT layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit.
* Model states and sharding: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models" (arXiv:1910.02054), section 3.1 (2 + 2 + 12 bytes/param for mixed-precision
  Adam) and section 5 (what ZeRO-1/2/3 partition); PyTorch FSDP ``FULL_SHARD`` is ZeRO-3.
* Compute-optimal training: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
  (arXiv:2203.15556): C = 6*N*D, D ~ 20*N, and the parametric fit L(N, D) = E + A/N^alpha + B/D^beta.

Where things are: ``memory.py`` (inference and training memory per device), ``chinchilla.py``
(compute-optimal N, D, C, the fitted loss and training time), ``report.py`` (the tables `lmlab plan`
prints), ``units.py`` (parsing '125M' / '80GiB', formatting bytes, counts and durations). Every public
name is importable from ``lmlab.scaling`` itself.
"""

from lmlab.scaling.chinchilla import (
    CHINCHILLA_A, CHINCHILLA_ALPHA, CHINCHILLA_B, CHINCHILLA_BETA, CHINCHILLA_E, ChinchillaPlan, chinchilla_loss,
    chinchilla_loss_optimal, chinchilla_optimal, training_flops, training_time,
)
from lmlab.scaling.memory import (
    ATTENTION_KERNELS, DTYPE_BYTES, OPTIMIZERS, PRECISIONS, STRATEGIES, InferenceMemory, TrainingMemory,
    activation_bytes, inference_memory, korthikanti_layer_bytes, kv_cache_bytes, layer_activation_bytes,
    layer_parameters, non_block_parameters, state_bytes_per_param, training_memory,
)
from lmlab.scaling.report import TABLE_STRATEGIES, chinchilla_report, memory_report
from lmlab.scaling.units import format_bytes, format_count, format_duration, format_flops, parse_bytes, parse_count

__all__ = [
    "ATTENTION_KERNELS", "CHINCHILLA_A", "CHINCHILLA_ALPHA", "CHINCHILLA_B", "CHINCHILLA_BETA", "CHINCHILLA_E",
    "DTYPE_BYTES", "OPTIMIZERS", "PRECISIONS", "STRATEGIES", "TABLE_STRATEGIES", "ChinchillaPlan", "InferenceMemory",
    "TrainingMemory", "activation_bytes", "chinchilla_loss", "chinchilla_loss_optimal", "chinchilla_optimal",
    "chinchilla_report", "format_bytes", "format_count", "format_duration", "format_flops", "inference_memory",
    "korthikanti_layer_bytes", "kv_cache_bytes", "layer_activation_bytes", "layer_parameters", "memory_report",
    "non_block_parameters", "parse_bytes", "parse_count", "state_bytes_per_param", "training_flops", "training_memory",
    "training_time",
]
