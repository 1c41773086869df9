"""One onnxruntime session of a serving model (inject --as-inputs), adapters swapped per run.

Usage: ort_swap.py SERVING.onnx INPUTS.npz BASE.npz TOL [ADAPTER.onnx_adapter EXPECTED.npz]...
Checks that with no adapter active the output equals BASE and that with each adapter active
it equals its EXPECTED (relative to the output's scale), alternating on the same session.
"""
import sys

import numpy as np
import onnxruntime as ort


def first(path):
    d = np.load(path)
    return d[d.files[0]].astype(np.float64)


def main(model, inputs, base, tol, *pairs):
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in np.load(inputs).items() if k in names}
    tol = float(tol)
    checks = [(None, first(base))] + [(pairs[i], first(pairs[i + 1])) for i in range(0, len(pairs), 2)]
    bad = []
    for rnd in range(2):  # twice, so each adapter follows another on the same session
        for path, expected in checks:
            opts = None
            if path:
                a = ort.LoraAdapter()
                a.Load(path)
                opts = ort.RunOptions()
                opts.add_active_adapter(a)
            out = sess.run(None, feeds, opts)[0].astype(np.float64)
            err = np.abs(out - expected).max() / max(np.abs(expected).max(), 1e-12)
            print(f"round {rnd} adapter={path}: rel_err={err:.3e}")
            if err > tol:
                bad.append(path)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(*sys.argv[1:])
