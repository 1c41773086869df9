"""Runs two models in onnxruntime (CPU) on the same seeded inputs and prints, as JSON, the
max abs difference of each output by name. Usage: ort_diff.py A.onnx B.onnx"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main(a, b):
    sa = ort.InferenceSession(a, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
             for i in sa.get_inputs()}
    names = [o.name for o in sa.get_outputs()]
    oa = sa.run(names, feeds)
    ob = sb.run(names, feeds)
    print(json.dumps({n: float(np.abs(x - y).max()) for n, x, y in zip(names, oa, ob)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
