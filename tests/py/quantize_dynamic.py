"""Quantizes a model's weights and activations dynamically with onnxruntime's quantize_dynamic
(MatMulInteger after DynamicQuantizeLinear; embedding tables int8, dequantized after Gather).

Usage: quantize_dynamic.py IN.onnx OUT.onnx
"""
import sys

from onnxruntime.quantization import QuantType, quantize_dynamic

quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
