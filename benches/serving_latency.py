"""Serving latency of LoRA deployments in onnxruntime (CPU), relative to the base model.

    python benches/serving_latency.py --base model.onnx --branches branches.onnx \
        --serving serving.onnx --adapter serving.onnx_adapter [--folded folded.onnx] \
        [--fused fused.onnx] [--weight weight.onnx] [--gated gated.onnx] [--runs 40] \
        [--rounds 4] [--seq 16] [--threads N]

  base            the model as exported
  branches        `onnx-lora inject --adapter` (unmerged: base + s*B(A(x)) beside each weight)
  fused           the same with `--fuse-shared` (optional)
  weight          the same with `--form weight` (optional): W + s·A·B, merged by onnxruntime
                  when the session loads
  serving idle    `onnx-lora inject --as-inputs` run with no adapter (empty default weights)
  serving active  the same model with the `.onnx_adapter` activated through RunOptions
  gated idle / gated active  the same with `--idle-gate` (optional): one If that runs the base
                  graph while every LoRA input is empty; same adapter file
  folded          `onnx-lora fold` output (optional; should cost what the base costs)

Batch 1, `--seq` tokens, input `input_ids`, onnxruntime's default session options.

How a ratio is measured. Two effects on this kind of machine are as large as the differences
being measured (a few percent), so neither is left to chance:
  - drift: the machine's speed wanders over seconds. The deployment and the base run in the same
    process in alternating blocks (2 untimed runs, then 5 timed), so both see the same moments;
  - placement: two sessions of the same model in one process differ by 1-4% depending on which
    was created first. Each round is a fresh process holding only the base and one deployment,
    and the creation order alternates between rounds.
A round's ratio is the deployment's median run time over the base's. The reported ratio is the
mean of the median over base-first rounds and the median over deployment-first rounds (the
load-order effect cancels), with every round's ratio listed. The largest output differences
between deployments that must agree are checked first (branches = serving active = folded;
serving idle = base).

Load cost. Each model is also loaded alone in a fresh process: session creation time, the
process's peak RSS, and its RSS once loaded, before and after glibc's malloc_trim (memory
onnxruntime freed but the allocator kept).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

# The performance issue's serving goals: latency vs the base at most this.
GOALS = [("branches (adapter)", 1.03), ("serving idle", 1.02), ("serving active", 1.03)]
BLOCK = 5  # timed runs per block
BLOCK_WARMUP = 2  # untimed runs before each block (the other session just ran)
ROUND_FLAG = "--measure-round"  # internal: this script re-run as one round's process
LOAD_FLAG = "--measure-load"  # internal: this script re-run to load one model alone


def session(path, threads):
    so = ort.SessionOptions()
    so.log_severity_level = 3  # serving models keep default weights in initializers: ort warns
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# Loaded adapters stay referenced here: RunOptions does not keep its adapter alive, and a
# collected one silently runs the model without it.
_ADAPTERS = []


def run_options(adapter_path):
    """RunOptions that activate the `.onnx_adapter` at `adapter_path` (None: no adapter)."""
    if not adapter_path:
        return None
    adapter = ort.LoraAdapter()
    adapter.Load(adapter_path)
    _ADAPTERS.append(adapter)
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    return ro


def measure_round(cfg):
    """One round, in its own process: load the base and one deployment in the given order,
    alternate blocks of runs, print the two median run times as JSON."""
    models = {key: session(cfg[key], cfg["threads"]) for key in cfg["order"]}
    feeds = {"input_ids": np.array(cfg["ids"], dtype=np.int64)}
    options = {"base": None, "deployment": run_options(cfg["adapter"])}
    times = {key: [] for key in models}
    for _ in range(cfg["blocks"]):
        for key in cfg["order"]:
            sess, ro = models[key], options[key]
            for _ in range(BLOCK_WARMUP):
                sess.run(None, feeds, ro)
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                sess.run(None, feeds, ro)
                times[key].append(time.perf_counter() - t0)
    print(json.dumps({key: statistics.median(t) for key, t in times.items()}))


def measure_load(path, threads):
    """Loads one model in this (fresh) process; prints load seconds and RSS figures as JSON."""
    import ctypes

    def status(key):
        # VmHWM (peak RSS) starts afresh at exec, unlike getrusage's ru_maxrss.
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    t0 = time.perf_counter()
    sess = session(path, threads)
    load_s = time.perf_counter() - t0
    loaded = status("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(json.dumps({"load_s": load_s, "peak": status("VmHWM"), "loaded": loaded,
                      "trimmed": status("VmRSS"), "inputs": len(sess.get_inputs())}))


def one_load(path, threads):
    p = subprocess.run([sys.executable, __file__, LOAD_FLAG, json.dumps([path, threads])],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"serving_latency.py: loading {path} failed:\n{p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def print_loads(args, deployments):
    print("load alone, fresh process (RSS in GB: peak while loading | once loaded | after malloc_trim):")
    loads = [("base", args.base)] + [(label, path) for label, path, adapter in deployments if not adapter]
    for label, path in loads:
        m = one_load(path, args.threads)
        print(f"  {label:<20} {m['load_s']:>6.2f} s   {m['peak'] / 1e9:>5.2f} | {m['loaded'] / 1e9:>5.2f} | "
              f"{m['trimmed'] / 1e9:>5.2f}", flush=True)


def one_round(cfg):
    p = subprocess.run([sys.executable, __file__, ROUND_FLAG, json.dumps(cfg)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"serving_latency.py: a measuring round failed:\n{p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--branches", required=True)
    p.add_argument("--serving", required=True)
    p.add_argument("--adapter", required=True, help="the .onnx_adapter written by inject --adapter-out")
    p.add_argument("--folded")
    p.add_argument("--fused", help="the branches model made with inject --fuse-shared")
    p.add_argument("--weight", help="the branches model made with inject --form weight")
    p.add_argument("--gated", help="the serving model made with inject --as-inputs --idle-gate")
    p.add_argument("--runs", type=int, default=40,
                   help=f"timed runs per model and round, in blocks of {BLOCK} (default 40)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds (processes) per deployment, half of them loading the base first (default 4)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=0, help="token ids are drawn below this (default: the last dim of the base's first output)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    p.add_argument("--load-only", action="store_true", help="only the load table (no latency rounds)")
    args = p.parse_args()
    rounds = max(2, args.rounds + args.rounds % 2)

    vocab = args.vocab
    if not vocab:
        out_shape = session(args.base, args.threads).get_outputs()[0].shape
        vocab = out_shape[-1] if isinstance(out_shape[-1], int) else 100
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(1, args.seq), dtype=np.int64)
    feeds = {"input_ids": ids}

    deployments = [("branches (adapter)", args.branches, None)]
    if args.fused:
        deployments.append(("branches fused", args.fused, None))
    if args.weight:
        deployments.append(("weight form", args.weight, None))
    deployments += [("serving idle", args.serving, None), ("serving active", args.serving, args.adapter)]
    if args.gated:
        deployments += [("gated idle", args.gated, None), ("gated active", args.gated, args.adapter)]
    if args.folded:
        deployments.append(("folded", args.folded, None))

    if args.load_only:
        print_loads(args, deployments)
        return

    # Outputs first, one session at a time.
    outs = {"base": session(args.base, args.threads).run(None, feeds)[0]}
    for label, path, adapter in deployments:
        outs[label] = session(path, args.threads).run(None, feeds, run_options(adapter))[0]

    blocks = max(1, -(-args.runs // BLOCK))
    print(f"onnxruntime {ort.__version__}, CPU, batch 1, {args.seq} tokens, threads "
          f"{args.threads or 'default'}; per deployment {rounds} rounds (fresh processes, base "
          f"and deployment alternating in {blocks} blocks of {BLOCK} runs after {BLOCK_WARMUP} "
          f"untimed; load order alternating)")
    print(f"{'deployment':<20} {'base ms':>8} {'ms':>8} {'vs base':>8}  base-first | deployment-first rounds")
    ratios = {}
    for label, path, adapter in deployments:
        firsts = {True: [], False: []}
        base_ms, dep_ms = [], []
        for r in range(rounds):
            base_first = r % 2 == 0
            cfg = {"base": args.base, "deployment": path, "adapter": adapter,
                   "order": ["base", "deployment"] if base_first else ["deployment", "base"],
                   "threads": args.threads, "ids": ids.tolist(), "blocks": blocks}
            m = one_round(cfg)
            firsts[base_first].append(m["deployment"] / m["base"])
            base_ms.append(m["base"])
            dep_ms.append(m["deployment"])
        ratio = (statistics.median(firsts[True]) + statistics.median(firsts[False])) / 2
        ratios[label] = ratio
        print(f"{label:<20} {statistics.median(base_ms) * 1e3:>8.2f} {statistics.median(dep_ms) * 1e3:>8.2f} "
              f"{ratio:>7.3f}x  " + " ".join(f"{x:.3f}" for x in firsts[True]) + " | "
              + " ".join(f"{x:.3f}" for x in firsts[False]), flush=True)

    print_loads(args, deployments)

    print("goals (performance issue):")
    # The weight form is an unmerged deployment of the adapter too: the branches' goal.
    # So is the gated serving model a serving model: the serving goals.
    extra = ([("weight form", 1.03)] if args.weight else []) + (
        [("gated idle", 1.02), ("gated active", 1.03)] if args.gated else [])
    for label, goal in GOALS + extra:
        verdict = "PASS" if ratios[label] <= goal else "MISS"
        print(f"  [{verdict}] {f'{label} <= {goal:.2f}x':<34} {ratios[label]:.3f}x")

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
    if args.weight:
        print(f"max |weight form - branches|:     {diff('weight form', 'branches (adapter)'):.3g}")
    if args.gated:
        print(f"max |gated idle - base|:          {diff('gated idle', 'base'):.3g}")
        print(f"max |gated active - branches|:    {diff('gated active', 'branches (adapter)'):.3g}")
    print(f"max |branches - base| (adapter effect): {diff('branches (adapter)', 'base'):.3g}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == ROUND_FLAG:
        measure_round(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == LOAD_FLAG:
        measure_load(*json.loads(sys.argv[2]))
    else:
        main()
