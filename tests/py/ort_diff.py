"""Runs two models in onnxruntime (CPU) on the same inputs and prints, as JSON, the max abs
difference of each output by name.

Usage: ort_diff.py A.onnx B.onnx [INPUTS.npz]   (seeded N(0,1) float inputs when no npz)
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main(a, b, inputs=None):
    sa = ort.InferenceSession(a, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b, providers=["CPUExecutionProvider"])
    if inputs:
        feeds = dict(np.load(inputs))
    else:
        rng = np.random.default_rng(0)
        feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
                 for i in sa.get_inputs()}
    names = [o.name for o in sa.get_outputs()]
    oa = sa.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sa.get_inputs()}})
    ob = sb.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sb.get_inputs()}})
    print(json.dumps({n: float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for n, x, y in zip(names, oa, ob)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
