"""Weight-only quantization: int8/int4 linear layers on PyTorch's fused CPU kernels, GGUF blocks loaded natively.

* ``linear``  Int8Linear, Int4Linear, QuantizedEmbedding (a tied head's rows), quantize_int8/int4
* ``model``   quantize_model (the module walker swaps the layers, returns a report), save/load of quantized checkpoints
* ``gguf``    GGUF Q4_0 / Q4_1 / Q8_0 tensors straight into those layers

See docs/quantization.md for the formats and the measured quality.
"""

from lmlab.quant.linear import (Int4Linear, Int8Linear, QuantizedEmbedding, QuantizedLinear, is_quantized,
                                quantize_int4, quantize_int8)
from lmlab.quant.model import QuantReport, load_quantized, parse_mode, quantize_model, save_quantized

__all__ = ["Int8Linear", "Int4Linear", "QuantizedLinear", "QuantizedEmbedding", "is_quantized", "quantize_int8",
           "quantize_int4", "QuantReport", "quantize_model", "save_quantized", "load_quantized", "parse_mode"]
