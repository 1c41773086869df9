"""Runs two models in onnxruntime (CPU) on the same inputs and prints, as JSON, the max abs
difference of each output by name.

Usage: ort_diff.py A.onnx B.onnx [INPUTS.npz]   (seeded N(0,1) float inputs when no npz)

A one-element bool input (a merged decoder's `use_cache_branch`) is fed both ways when there is
no npz; each output's difference is the larger of the two runs.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main(a, b, inputs=None):
    sa = ort.InferenceSession(a, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b, providers=["CPUExecutionProvider"])
    switches = []
    if inputs:
        feeds = dict(np.load(inputs))
    else:
        rng = np.random.default_rng(0)
        feeds = {}
        for i in sa.get_inputs():
            shape = [d if isinstance(d, int) else 2 for d in i.shape]
            if i.type == "tensor(bool)":
                feeds[i.name] = np.zeros(shape, bool)
                switches.append(i.name)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    names = [o.name for o in sa.get_outputs()]
    worst = {n: 0.0 for n in names}
    for value in ([False, True] if switches else [None]):
        for s in switches:
            feeds[s] = np.full(feeds[s].shape, value)
        oa = sa.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sa.get_inputs()}})
        ob = sb.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sb.get_inputs()}})
        for n, x, y in zip(names, oa, ob):
            worst[n] = max(worst[n], float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
    print(json.dumps(worst))


if __name__ == "__main__":
    main(*sys.argv[1:4])
