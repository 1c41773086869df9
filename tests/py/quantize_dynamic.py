"""Quantizes a model's weights and activations dynamically with onnxruntime's quantize_dynamic
(MatMulInteger after DynamicQuantizeLinear; embedding tables int8, dequantized after Gather).
With EXCLUDE, the nodes whose name contains it stay float (a partly quantized model; an
injected model's branches).

Usage: quantize_dynamic.py IN.onnx OUT.onnx [EXCLUDE]
"""
import sys

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

exclude = []
if len(sys.argv) > 3:
    exclude = [n.name for n in onnx.load(sys.argv[1]).graph.node
               if sys.argv[3] in n.name]
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
