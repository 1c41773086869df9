"""Loads each model in onnxruntime (CPU) and runs it on seeded random inputs; with two models,
checks they give the same outputs. Proves a file we wrote is accepted by onnxruntime.

Usage: ort_run.py MODEL [SAME_AS_MODEL]
"""
import sys

import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}


def run(path, feeds=None):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    if feeds is None:
        rng = np.random.default_rng(0)
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 2 for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(TYPES[i.type])
    return feeds, sess.run(None, feeds)


def main(args):
    feeds, out = run(args[0])
    if len(args) > 1:
        _, out2 = run(args[1], feeds)
        for a, b in zip(out, out2):
            np.testing.assert_array_equal(a, b)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
