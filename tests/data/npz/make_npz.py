"""Writes the numpy files the npz reader tests read (run from anywhere; writes beside itself):
one per dtype, with np.save / np.savez / np.savez_compressed, plus expected.json holding each
array's dtype, shape and values (C order) as numpy reports them.

bfloat16 has no numpy dtype: bf16.npz stores the bits as uint16 (the upper half of the float32
bits of values that bf16 represents exactly), and expected.json lists the float values too.
"""
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def bf16_bits(values):
    return (np.array(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


BF16_VALUES = [1.0, -2.5, 0.15625, 3072.0]

FILES = {
    "float32.npz": ("savez", {
        "a": (np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5 - 1),
        "scalar": np.array(3.25, dtype=np.float32),
    }),
    "float16_compressed.npz": ("savez_compressed", {
        "h": np.array([[0.5, -1.25], [65504.0, 6.1e-5], [0.0, -0.0]], dtype=np.float16),
    }),
    "bf16.npz": ("savez", {"w": bf16_bits(BF16_VALUES)}),
    "int64.npy": ("save", np.array([0, -1, 2**40, 7], dtype=np.int64)),
    "int32_compressed.npz": ("savez_compressed", {
        "i": np.array([[1, -2], [2**31 - 1, -2**31]], dtype=np.int32),
    }),
    "bool.npz": ("savez", {"m": np.array([True, False, True, True, False])}),
    "float64.npy": ("save", np.array([[1.5, -2.0e-300, 1e300]], dtype=np.float64)),
    "mixed_compressed.npz": ("savez_compressed", {
        "u8": np.array([0, 255, 7], dtype=np.uint8),
        "i8": np.array([-128, 127, 0], dtype=np.int8),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "big_endian": np.array([1, -2, 300], dtype=">i4"),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }),
}


def describe(a):
    return {
        "dtype": a.dtype.newbyteorder("=").name,
        "shape": list(a.shape),
        "values": [float(v) if a.dtype.kind == "f" else int(v) for v in a.ravel(order="C")],
    }


def main():
    expected = {}
    for name, (how, data) in FILES.items():
        path = os.path.join(HERE, name)
        if how == "save":
            np.save(path, data)
            expected[name] = {os.path.splitext(name)[0]: describe(data)}
        else:
            getattr(np, how)(path, **data)
            expected[name] = {k: describe(v) for k, v in data.items()}
    expected["bf16.npz"]["w"]["bf16_values"] = BF16_VALUES
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
