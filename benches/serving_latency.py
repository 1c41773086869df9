"""Serving latency of LoRA deployments in onnxruntime (CPU), relative to the base model.

    python benches/serving_latency.py --base model.onnx --branches branches.onnx \
        --serving serving.onnx --adapter serving.onnx_adapter [--folded folded.onnx] \
        [--runs 30] [--rounds 3] [--warmup 5] [--seq 16] [--threads N]

  base            the model as exported
  branches        `onnx-lora inject --adapter` (unmerged: base + s*B(A(x)) beside each weight)
  serving idle    `onnx-lora inject --as-inputs` run with no adapter (empty default weights)
  serving active  the same model with the `.onnx_adapter` activated through RunOptions
  folded          `onnx-lora fold` output (optional; should cost what the base costs)

Batch 1, `--seq` tokens, input `input_ids`. Every model is measured once per round, in turn;
reports the mean and median wall time of `InferenceSession.run` after the warm-up runs, the
ratio to the base taken within each round (median over rounds), and the largest output difference between the
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
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all the models")
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

    outs = {}
    adapter = ort.LoraAdapter()
    adapter.Load(args.adapter)
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    models = [("base", args.base, None), ("branches (adapter)", args.branches, None)]
    if args.fused:
        models.append(("branches fused", args.fused, None))
    models += [("serving idle", args.serving, None), ("serving active", args.serving, ro)]
    if args.folded:
        models.append(("folded", args.folded, None))

    # Every model is measured once per round, in turn; the ratio to the base is taken within
    # each round (same machine state) and the median over rounds is reported, so a slow drift
    # of the machine's speed does not land on one model.
    per_round = {label: [] for label, _, _ in models}
    for _ in range(args.rounds):
        for label, path, run_options in models:
            sess = session(path, args.threads)
            mean, med, out = bench(sess, feeds, args.runs, args.warmup, run_options)
            per_round[label].append((mean, med))
            outs[label] = out
            del sess

    base = per_round["base"]
    print(f"onnxruntime {ort.__version__}, CPU, batch 1, {args.seq} tokens, {args.rounds} rounds of "
          f"{args.runs} runs after {args.warmup} warm-up; vs base = median over rounds of (median / base median)")
    print(f"{'model':<20} {'mean ms':>9} {'median ms':>10} {'vs base':>8}  per round")
    for label, _, _ in models:
        rs = per_round[label]
        ratios = [m[1] / b[1] for m, b in zip(rs, base)]
        print(f"{label:<20} {statistics.mean(m[0] for m in rs) * 1e3:>9.3f} "
              f"{statistics.median(m[1] for m in rs) * 1e3:>10.3f} {statistics.median(ratios):>7.3f}x  "
              + " ".join(f"{r:.3f}" for r in ratios))

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
