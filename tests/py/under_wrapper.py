"""Puts a TorchScript export's module paths under a wrapper module, as exporting the model
inside another would: node names `/x_embedder/MatMul` become `/transformer/x_embedder/MatMul`,
and named parameters `proj_out.bias` become `transformer.proj_out.bias` (inputs renamed with
them).

Usage: under_wrapper.py IN.onnx OUT.onnx WRAPPER
"""
import sys

import onnx

m = onnx.load(sys.argv[1])
w = sys.argv[3]
renamed = {}
for t in m.graph.initializer:
    if "." in t.name and not t.name.startswith("onnx::"):
        renamed[t.name] = f"{w}.{t.name}"
        t.name = renamed[t.name]
for n in m.graph.node:
    if n.name.startswith("/"):
        n.name = f"/{w}{n.name}"
    for i, x in enumerate(n.input):
        if x in renamed:
            n.input[i] = renamed[x]
onnx.save(m, sys.argv[2])
