"""Checks that pairs of ONNX models are the same protobuf once external data is resolved.

Usage: proto_equal.py ORIGINAL CONVERTED [ORIGINAL CONVERTED ...]
Exit 0 when every pair is equal; otherwise prints the differing pairs and exits 1.
Loading goes through the `onnx` package (the reference reader), with external data loaded, so
this also proves our output is readable by it.
"""
import sys

import onnx


def normalized(path):
    m = onnx.load(path, load_external_data=True)
    # onnx.load marks tensors it inlined as DEFAULT explicitly; inline tensors have no field.
    for t in _tensors(m):
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.DEFAULT:
            t.ClearField("data_location")
    return m


def _graph_tensors(g):
    yield from g.initializer
    for s in g.sparse_initializer:
        yield s.values
        yield s.indices
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for sub in a.graphs:
                yield from _graph_tensors(sub)


def _tensors(m):
    yield from _graph_tensors(m.graph)
    for ti in m.training_info:
        yield from _graph_tensors(ti.initialization)
        yield from _graph_tensors(ti.algorithm)


def main(args):
    if len(args) % 2:
        sys.exit("usage: proto_equal.py ORIGINAL CONVERTED [...]")
    bad = []
    for a, b in zip(args[0::2], args[1::2]):
        if normalized(a).SerializeToString(deterministic=True) != normalized(b).SerializeToString(deterministic=True):
            bad.append((a, b))
    for a, b in bad:
        print(f"DIFFERENT: {a} -> {b}")
    print(f"{len(args) // 2 - len(bad)} equal, {len(bad)} different")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
