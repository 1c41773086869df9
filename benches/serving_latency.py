"""Serving latency of LoRA deployments in onnxruntime (CPU), relative to the base model.

    python benches/serving_latency.py --base model.onnx --branches branches.onnx \
        --serving serving.onnx --adapter serving.onnx_adapter [--folded folded.onnx] \
        [--runs 50] [--warmup 5] [--seq 16] [--threads N]

  base            the model as exported
  branches        `onnx-lora inject --adapter` (unmerged: base + s*B(A(x)) beside each weight)
  serving idle    `onnx-lora inject --as-inputs` run with no adapter (empty default weights)
  serving active  the same model with the `.onnx_adapter` activated through RunOptions
  folded          `onnx-lora fold` output (optional; should cost what the base costs)

Batch 1, `--seq` tokens, input `input_ids`. Reports the mean and median wall time of
`InferenceSession.run` after the warm-up runs, and the largest output difference between the
deployments that must agree (branches = serving active = folded; serving idle = base).
"""

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    so = ort.SessionOptions()
    so.log_severity_level = 3  # serving models keep default weights in initializers: ort warns
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def bench(sess, feeds, runs, warmup, run_options=None):
    for _ in range(warmup):
        sess.run(None, feeds, run_options)
    times = []
    out = None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = sess.run(None, feeds, run_options)
        times.append(time.perf_counter() - t0)
    return statistics.mean(times), statistics.median(times), out[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--branches", required=True)
    p.add_argument("--serving", required=True)
    p.add_argument("--adapter", required=True, help="the .onnx_adapter written by inject --adapter-out")
    p.add_argument("--folded")
    p.add_argument("--fused", help="the branches model made with inject --fuse-shared")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=0, help="token ids are drawn below this (default: the last dim of the base's first output)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    args = p.parse_args()

    vocab = args.vocab
    if not vocab:
        out_shape = session(args.base, args.threads).get_outputs()[0].shape
        vocab = out_shape[-1] if isinstance(out_shape[-1], int) else 100
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, vocab, size=(1, args.seq), dtype=np.int64)}

    rows = []
    outs = {}

    def measure(label, path, run_options=None):
        sess = session(path, args.threads)
        mean, med, out = bench(sess, feeds, args.runs, args.warmup, run_options)
        rows.append((label, mean, med))
        outs[label] = out

    measure("base", args.base)
    measure("branches (adapter)", args.branches)
    if args.fused:
        measure("branches fused", args.fused)
    measure("serving idle", args.serving)
    adapter = ort.LoraAdapter()
    adapter.Load(args.adapter)
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    measure("serving active", args.serving, ro)
    if args.folded:
        measure("folded", args.folded)

    base = rows[0][1]
    print(f"onnxruntime {ort.__version__}, CPU, batch 1, {args.seq} tokens, {args.runs} runs after {args.warmup} warm-up")
    print(f"{'model':<20} {'mean ms':>9} {'median ms':>10} {'vs base':>8}")
    for label, mean, med in rows:
        print(f"{label:<20} {mean * 1e3:>9.3f} {med * 1e3:>10.3f} {mean / base:>7.2f}x")

    def diff(a, b):
        return float(np.max(np.abs(outs[a].astype(np.float64) - outs[b].astype(np.float64))))

    scale = float(np.max(np.abs(outs["branches (adapter)"])))
    print(f"max |logits| (branches): {scale:.4g}")
    print(f"max |serving idle - base|:        {diff('serving idle', 'base'):.3g}")
    print(f"max |serving active - branches|:  {diff('serving active', 'branches (adapter)'):.3g}")
    if args.folded:
        print(f"max |folded - branches|:          {diff('folded', 'branches (adapter)'):.3g}")
    if args.fused:
        print(f"max |fused - branches|:           {diff('branches fused', 'branches (adapter)'):.3g}")
    print(f"max |branches - base| (adapter effect): {diff('branches (adapter)', 'base'):.3g}")


if __name__ == "__main__":
    main()
