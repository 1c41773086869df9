"""Writes .npz files whose arrays' headers declare more than their data holds, into OUT:

  bad_shape.npz  'x' (deflated) declares float32 (1, 2**40) and holds no data: an input file
                 whose header alone says it cannot feed linear.onnx's x [2, 8]
  junk.npz       'x' float32 (2, 8), 'junk' declaring float32 (3,) with 4 bytes of data
                 (unreadable, and no model input), 'words' of strings (no model input)
  huge_header.npz  'x' whose version 2 header declares 2 GiB

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
        z.writestr("words.npy", npy_header("<U2", (1,)) + b"\0" * 8)
    # a version 2 header declaring 2 GiB of header
    with zipfile.ZipFile(f"{out}/huge_header.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{")


if __name__ == "__main__":
    main(sys.argv[1])
