"""Models whose tensors or layers say something impossible, written with onnx.helper (no
checker): a reader must refuse them in one line, never panic or misread them.

  ext_huge.onnx     MatMul weight in external data (w.bin, 64 bytes) with dims [2^62, 4]
  ext_negative.onnx the same weight with dims [-4, 4] and length 0
  ext_string.onnx   the weight as a [4, 4] STRING tensor in external data (ORT refuses it)
  ext_undefined.onnx  the same with data_type 0 (UNDEFINED)
  segment.onnx      inline weight with TensorProto.segment set and 8 bytes for a [4, 4] shape
  raw_empty.onnx    inline weight with raw_data set but empty, its values in float_data
  huge_group.onnx   Conv whose group is 2^62
  gemm_alpha0.onnx  Gemm (transB=1) on /fc/Gemm with alpha = 0
  conv_1x9.onnx     Conv /conv/Conv with a [4, 2, 1, 9] kernel (pads keep the width)
  weight_output.onnx  linear MatMul /fc/MatMul whose weight fc.weight [8, 4] is also a graph output

Usage: make_malformed_models.py OUT_DIR
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto as TP, helper, numpy_helper

out = sys.argv[1]


def save(nodes, inputs, outputs, inits, name):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    with open(os.path.join(out, name), "wb") as f:
        f.write(m.SerializeToString())


def matmul(w, name):
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, None)
    save([helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")], [x], [y], [w], name)


with open(os.path.join(out, "w.bin"), "wb") as f:
    f.write(bytes(64))
for name, dims, length in [("ext_huge.onnx", [1 << 62, 4], "64"), ("ext_negative.onnx", [-4, 4], "0")]:
    w = TP(name="fc.weight", data_type=TP.FLOAT, dims=dims)
    w.data_location = TP.EXTERNAL
    w.external_data.add(key="location", value="w.bin")
    w.external_data.add(key="length", value=length)
    matmul(w, name)
for name, dtype in [("ext_string.onnx", TP.STRING), ("ext_undefined.onnx", TP.UNDEFINED)]:
    w = TP(name="fc.weight", data_type=dtype, dims=[4, 4])
    w.data_location = TP.EXTERNAL
    w.external_data.add(key="location", value="w.bin")
    w.external_data.add(key="length", value="64")
    matmul(w, name)

w = numpy_helper.from_array(np.ones((4, 4), np.float32), "fc.weight")
w.segment.begin = 0
w.segment.end = 1
w.raw_data = w.raw_data[:8]
matmul(w, "segment.onnx")

w = TP(name="fc.weight", data_type=TP.FLOAT, dims=[4, 4])
w.raw_data = b""
w.float_data.extend([1.0] * 16)
matmul(w, "raw_empty.onnx")

x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 2, 8, 8])
y = helper.make_tensor_value_info("y", TP.FLOAT, None)
k = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "conv.weight")
save([helper.make_node("Conv", ["x", "conv.weight"], ["y"], name="/conv/Conv", group=1 << 62)],
     [x], [y], [k], "huge_group.onnx")
k = numpy_helper.from_array(np.ones((4, 2, 1, 9), np.float32) * 0.1, "conv.weight")
save([helper.make_node("Conv", ["x", "conv.weight"], ["y"], name="/conv/Conv", kernel_shape=[1, 9],
                       pads=[0, 4, 0, 4])], [x], [y], [k], "conv_1x9.onnx")

x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 8])
w = numpy_helper.from_array(np.ones((4, 8), np.float32), "fc.weight")
save([helper.make_node("Gemm", ["x", "fc.weight"], ["y"], name="/fc/Gemm", transB=1, alpha=0.0)],
     [x], [y], [w], "gemm_alpha0.onnx")

x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 8])
w = numpy_helper.from_array(np.ones((8, 4), np.float32), "fc.weight")
w_out = helper.make_tensor_value_info("fc.weight", TP.FLOAT, [8, 4])
save([helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")], [x], [y, w_out], [w],
     "weight_output.onnx")
