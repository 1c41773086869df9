"""Saves the model as onnxruntime optimizes it for CPU (extended level: its contrib fusions,
e.g. DynamicQuantizeMatMul and MatMulIntegerToFloat for quantize_dynamic's layers).

Usage: ort_optimize.py IN.onnx OUT.onnx
"""
import sys

import onnxruntime as ort

so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
so.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
