"""Converts a model to float16 with onnxruntime's converter, keeping float32 inputs and outputs
(keep_io_types=True), as users deploying fp16 usually do.

Usage: to_fp16_keepio.py IN.onnx OUT.onnx
"""
import sys

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

onnx.save(convert_float_to_float16(onnx.load(sys.argv[1]), keep_io_types=True), sys.argv[2])
