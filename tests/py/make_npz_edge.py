"""Writes .npz files whose arrays' headers declare more than their data holds, into OUT:

  bad_shape.npz  'x' (deflated) declares float32 (1, 2**40) and holds no data: an input file
                 whose header alone says it cannot feed linear.onnx's x [2, 8]
  junk.npz       'x' float32 (2, 8), and 'junk' declaring float32 (3,) with 4 bytes of data
                 (unreadable, and no model input)

usage: make_npz_edge.py OUT
"""
import struct
import sys
import zipfile

import numpy as np


def npy_header(descr, shape):
    h = ("{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))).encode()
    h += b" " * ((64 - (len(h) + 11) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def main(out):
    with zipfile.ZipFile(f"{out}/bad_shape.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy_header("<f4", (1, 2**40)))
    x = np.full((2, 8), 0.5, np.float32)
    with zipfile.ZipFile(f"{out}/junk.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy_header("<f4", x.shape) + x.tobytes())
        z.writestr("junk.npy", npy_header("<f4", (3,)) + b"\0\0\0\0")


if __name__ == "__main__":
    main(sys.argv[1])
