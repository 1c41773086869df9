"""Loads a model in onnxruntime (CPU, default session options) and prints, as JSON, how many
nodes of each op type the optimized graph it runs has (after constant folding and fusions).

Usage: ort_kernels.py MODEL.onnx
"""
import collections
import json
import os
import sys
import tempfile

import onnx
import onnxruntime as ort


def main(model):
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    print(json.dumps(collections.Counter(n.op_type for n in graph.node)))


if __name__ == "__main__":
    main(sys.argv[1])
