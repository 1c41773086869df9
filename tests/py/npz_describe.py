"""Prints, as JSON, what numpy reads from an .npz: {name: {dtype, shape, values (C order)}}.
Used to check onnx-lora's npz writer against numpy itself.

Usage: npz_describe.py FILE.npz
"""
import json
import sys

import numpy as np


def describe(a):
    return {
        "dtype": a.dtype.name,
        "shape": list(a.shape),
        "values": [float(v) if a.dtype.kind == "f" else int(v) for v in a.ravel(order="C")],
    }


if __name__ == "__main__":
    with np.load(sys.argv[1]) as f:
        print(json.dumps({k: describe(f[k]) for k in f.files}))
