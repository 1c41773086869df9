"""Runs a model in onnxruntime (CPU) on stored inputs and compares its first output with
stored expected outputs, relative to the expected output's scale.

Usage: ort_compare.py MODEL INPUTS.npz EXPECTED.npz TOL [--differs BASE.npz] [--adapter FILE]
                      [--same-as MODEL2]
  pass when max|out - expected| <= TOL * max|expected|;
  --differs: also require max|out - base| > 10 * TOL * max|base| (the adapter really acts);
  --adapter: run with this .onnx_adapter active (onnxruntime.LoraAdapter);
Prints one line with the measured differences; exit 1 on failure.
"""
import argparse
import sys

import numpy as np
import onnxruntime as ort


def run(model, feeds, adapter=None):
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    opts = None
    if adapter:
        a = ort.LoraAdapter()
        a.Load(adapter)
        opts = ort.RunOptions()
        opts.add_active_adapter(a)
    return sess.run(None, feeds, opts)[0]


def first(npz):
    d = np.load(npz)
    return d[d.files[0]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("expected")
    p.add_argument("tol", type=float)
    p.add_argument("--differs")
    p.add_argument("--adapter")
    a = p.parse_args()
    feeds = dict(np.load(a.inputs))
    out = run(a.model, feeds, a.adapter).astype(np.float64)
    exp = first(a.expected).astype(np.float64)
    if out.shape != exp.shape:
        print(f"FAIL shape {out.shape} vs expected {exp.shape}")
        sys.exit(1)
    scale = max(np.abs(exp).max(), 1e-12)
    err = np.abs(out - exp).max() / scale
    ok = err <= a.tol
    msg = f"rel_err={err:.3e} tol={a.tol:.1e}"
    if a.differs:
        base = first(a.differs).astype(np.float64)
        d = np.abs(out - base).max() / max(np.abs(base).max(), 1e-12)
        msg += f" vs_base={d:.3e}"
        ok = ok and d > 10 * a.tol
    print(("ok " if ok else "FAIL ") + msg)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
