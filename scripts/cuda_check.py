#!/usr/bin/env python3
"""Check onnx-lora's CUDA path on a machine with an NVIDIA GPU (CI has none).

    python3 scripts/cuda_check.py --bin target/release/onnx-lora [--ort-lib libonnxruntime.so]
        [--cpu-ort-lib CPU_ONLY_libonnxruntime.so] [--bench target/release/bench] [--out report.json]

Needs onnxruntime-gpu's libonnxruntime.so (--ort-lib, else onnx-lora's own search) and the CUDA
libraries it was built for, installed system-wide or by pip (onnx-lora opens pip's `nvidia`
packages itself). Only the standard library is used.

What it checks, every fixture in fixtures/manifest.json and kohya_manifest.json:
  1. --ep cuda and --ep auto run on CUDA (the verdict's `ep`), with no CUDA library path set;
  2. the base model on CUDA matches the outputs PyTorch computed (io/base.npz);
  3. `fold` of every adapter, run on CUDA, matches PEFT's unmerged forward;
  4. `inject --adapter` (branches) likewise;
  5. `inject --as-inputs` with the adapter activated through onnxruntime's LoRA API on CUDA;
  6. with --cpu-ort-lib (a CPU-only onnxruntime, 1.31 or later like any onnxruntime onnx-lora
     loads): --ep cuda fails with exit 2 and one line, --ep auto falls back to onnxruntime's CPU
     with a note;
  7. with --bench: a Llama-shaped model (`bench --size small|full`) and its deployments, timed
     on CUDA (`verify --runs`; batch 1, 16 tokens), as ratios to the base.
Comparisons use verify's CUDA default tolerances. Exit status 0 when every check passed.
"""

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")


def run(cmd, timeout=300, env=None):
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout, p.stderr, time.time() - t
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout} s", time.time() - t
    except OSError as e:  # a missing binary or tool: a failed check, not a traceback
        return 127, "", f"{cmd[0]}: {e}", time.time() - t


def verdict(stdout):
    """The verdict record and the largest max_abs_diff of a `verify --json` run."""
    v, worst = None, 0.0
    for line in stdout.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("type") == "verdict":
            v = r
        elif r.get("type") == "output" and r.get("max_abs_diff") is not None:
            worst = max(worst, r["max_abs_diff"])
    return v, worst


class Checker:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.results = []
        self.ort = ["--ort-lib", args.ort_lib] if args.ort_lib else []

    def lora(self, *a, timeout=300):
        return run([self.args.bin, *a], timeout=timeout)

    def verify(self, label, model, inputs, expect, adapter=None, ep=None):
        cmd = ["verify", model, "--inputs", inputs, "--expect", expect, "--ep", ep or self.args.ep,
               "--json", *self.ort]
        if adapter:
            cmd += ["--adapter", adapter]
        rc, out, err, secs = self.lora(*cmd)
        v, worst = verdict(out)
        ok = rc == 0 and v is not None and v.get("passed") and v.get("ep") == (ep or self.args.ep)
        return {"check": label, "ok": bool(ok), "rc": rc, "ep": v and v.get("ep"),
                "max_abs_diff": worst, "secs": round(secs, 2),
                "error": "" if ok else (err.strip() or out.strip())[-600:]}

    def rewrite(self, label, args, then):
        rc, out, err, _ = self.lora(*args)
        if rc != 0:
            return {"check": label, "ok": False, "rc": rc, "error": err.strip()[-600:]}
        return then()


def fixture_jobs(chk):
    """(label, thunk) for every fixture check."""
    jobs = []
    for manifest in ("manifest.json", "kohya_manifest.json"):
        data = json.load(open(os.path.join(FIX, manifest)))
        for case in data.get("cases", data):
            onnx = os.path.join(FIX, case["onnx"])
            inputs = os.path.join(FIX, case["inputs"])
            tag = f"{case['model']}/{case['exporter']}"
            base = os.path.join(FIX, case["base"])
            jobs.append((f"{tag} base", lambda o=onnx, i=inputs, b=base, t=tag:
                         chk.verify(f"{t} base", o, i, b)))
            served = False
            ads = sorted(case["adapters"], key=lambda a: -len(a["targets"]))
            for ad in ads:
                feats = set(ad["features"])
                if ad.get("refuse") or "grouped_conv" in feats or not ad.get("unmerged"):
                    continue
                src = os.path.join(FIX, ad["dir"])
                exp = os.path.join(FIX, ad["unmerged"])
                stem = os.path.join(chk.work, f"{case['model']}_{case['exporter']}_{ad['name']}")
                lab = f"{tag} {ad['name']}"
                jobs.append((lab + " fold", lambda s=src, e=exp, st=stem, l=lab, i=inputs, o=onnx:
                             chk.rewrite(l + " fold", ["fold", o, s, "-o", st + ".fold.onnx"],
                                         lambda: chk.verify(l + " fold", st + ".fold.onnx", i, e))))
                if "shared_layer" in feats:
                    continue
                jobs.append((lab + " branches", lambda s=src, e=exp, st=stem, l=lab, i=inputs, o=onnx:
                             chk.rewrite(l + " branches",
                                         ["inject", o, "--adapter", s, "-o", st + ".inj.onnx"],
                                         lambda: chk.verify(l + " branches", st + ".inj.onnx", i, e))))
                servable = not (feats & {"dora", "lora_bias", "modules_to_save", "trainable_tokens",
                                          "bias_all", "bias_lora_only", "lycoris", "split_in_proj"}) \
                    and "conv" not in ad["kinds"]
                if servable and not served:
                    served = True
                    jobs.append((lab + " serving", lambda s=src, e=exp, st=stem, l=lab, i=inputs, o=onnx:
                                 chk.rewrite(l + " serving",
                                             ["inject", o, "--as-inputs", "--adapter", s,
                                              "--adapter-out", st + ".onnx_adapter",
                                              "-o", st + ".srv.onnx"],
                                             lambda: chk.verify(l + " serving", st + ".srv.onnx", i, e,
                                                                adapter=st + ".onnx_adapter"))))
    return jobs


def ep_checks(chk):
    """--ep cuda / auto pick CUDA; a CPU-only library: cuda fails, auto falls back."""
    out = []
    m = os.path.join(FIX, "llama/dynamo/model.onnx")
    for ep in ("cuda", "auto"):
        rc, o, e, _ = chk.lora("verify", m, m, "--ep", ep, "--json", *chk.ort)
        v, _ = verdict(o)
        ok = rc == 0 and v is not None and v.get("ep") == "cuda"
        out.append({"check": f"--ep {ep} runs on CUDA", "ok": ok, "rc": rc,
                    "ep": v and v.get("ep"), "stderr": e.strip()[-600:]})
    if chk.args.cpu_ort_lib:
        lib = ["--ort-lib", chk.args.cpu_ort_lib]
        rc, o, e, _ = chk.lora("verify", m, m, "--ep", "cuda", *lib)
        lines = [line for line in e.splitlines() if line.strip()]
        ok = rc == 2 and len(lines) == 1 and "CUDA execution provider" in e and not o.strip()
        out.append({"check": "CPU-only onnxruntime: --ep cuda fails clearly", "ok": ok, "rc": rc,
                    "stderr": e.strip()[-600:]})
        rc, o, e, _ = chk.lora("verify", m, m, "--ep", "auto", "--json", *lib)
        v, _ = verdict(o)
        ok = rc == 0 and v is not None and v.get("ep") == "cpu" and "running on onnxruntime's CPU" in e
        out.append({"check": "CPU-only onnxruntime: --ep auto falls back to CPU", "ok": ok, "rc": rc,
                    "stderr": e.strip()[-600:]})
    return out


def latency(chk):
    """A Llama-shaped model and its deployments timed on CUDA, relative to the base."""
    a = chk.args
    d = os.path.join(chk.work, "bench")
    rc, o, e, secs = run([a.bench, "--size", a.bench_size, "--dir", d, "--keep", "--no-python",
                          "--runs", "1", "--warmup", "0"], timeout=a.bench_timeout)
    res = {"check": f"latency ({a.bench_size})", "bench_rc": rc, "bench_secs": round(secs, 1),
           "bench_stdout": o[-3000:]}
    if rc != 0:
        res.update(ok=False, error=e[-600:])
        return res
    models = {
        "base": (os.path.join(d, "model/model.onnx"), None),
        "folded": (os.path.join(d, "out/fold/model.onnx"), None),
        "branches": (os.path.join(d, "out/inject_adapter/model.onnx"), None),
        "weight form": (os.path.join(d, "out/inject_weight/model.onnx"), None),
        "serving idle": (os.path.join(d, "out/inject_serving/model.onnx"), None),
        "serving active": (os.path.join(d, "out/inject_serving/model.onnx"),
                           os.path.join(d, "out/inject_serving/model.onnx_adapter")),
        "branches fused": (os.path.join(d, "out/inject_fused/model.onnx"), None),
        "gated idle": (os.path.join(d, "out/inject_gated/model.onnx"), None),
        "gated active": (os.path.join(d, "out/inject_gated/model.onnx"),
                         os.path.join(d, "out/inject_serving/model.onnx_adapter")),
    }
    ms = {}  # label -> {round: mean ms}
    for rnd in range(a.rounds):
        for label, (path, adapter) in models.items():
            if not os.path.exists(path):
                continue
            cmd = ["verify", path, path, "--ep", a.ep, "--runs", str(a.runs), "--json", *chk.ort]
            if adapter:
                cmd += ["--adapter", adapter]
            rc, o, e, _ = chk.lora(*cmd, timeout=600)
            v, _ = verdict(o)
            if not v:
                res.setdefault("errors", []).append(f"{label}: rc {rc}: {e.strip()[-300:]}")
                continue
            # A runs first, with the adapter; B is the same file without it.
            ms.setdefault(label, {})[rnd] = v["models"][0]["mean_ms"]
    # Each round's ratio to that round's base, then the median over rounds.
    base = ms.get("base", {})
    res["mean_ms"] = {k: [round(x, 3) for x in v.values()] for k, v in ms.items()}
    res["ratio_to_base"] = {}
    for k, v in ms.items():
        ratios = sorted(x / base[r] for r, x in v.items() if r in base)
        if ratios:
            res["ratio_to_base"][k] = round(ratios[len(ratios) // 2], 3)
    res["ok"] = "errors" not in res
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the onnx-lora binary")
    p.add_argument("--ort-lib", help="onnxruntime-gpu's libonnxruntime.so (default: onnx-lora's search)")
    p.add_argument("--cpu-ort-lib", help="a CPU-only libonnxruntime.so (1.31 or later), to check refusal and fallback")
    p.add_argument("--ep", default="cuda", help="EP the fixture checks demand (cpu: a dry run)")
    p.add_argument("--bench", help="the bench binary, to time a Llama-shaped model on CUDA")
    p.add_argument("--bench-size", default="small", choices=["tiny", "small", "full"])
    p.add_argument("--bench-timeout", type=int, default=900, help="seconds for bench to make the models")
    p.add_argument("--runs", type=int, default=200, help="runs per model and round for latency")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the models for latency")
    p.add_argument("--only", action="append", choices=["base", "fold", "branches", "serving"],
                   help="run only these fixture checks (repeatable; default: all)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", help="write the full report here (JSON)")
    a = p.parse_args()
    for var in ("LD_LIBRARY_PATH", "ORT_DYLIB_PATH"):
        if os.environ.pop(var, None) is not None:
            print(f"note: {var} unset for the checks (onnx-lora must find the libraries itself)")
    t0 = time.time()
    report = {"nvidia_smi": run(["nvidia-smi", "-L"])[1].strip() if a.ep == "cuda" else None}
    with tempfile.TemporaryDirectory() as work:
        chk = Checker(a, work)
        results = ep_checks(chk) if a.ep == "cuda" else []
        with cf.ThreadPoolExecutor(a.jobs) as pool:
            jobs = [f for label, f in fixture_jobs(chk)
                    if not a.only or label.rsplit(" ", 1)[-1] in a.only]
            futs = [pool.submit(f) for f in jobs]
            results += [f.result() for f in futs]
        report["results"] = results
        if a.out:
            json.dump(report, open(a.out, "w"), indent=1)
        if a.bench:
            results.append(latency(chk))
    report["results"] = results
    report["secs"] = round(time.time() - t0, 1)
    bad = [r for r in results if not r.get("ok")]
    kinds = {}
    for r in results:
        k = r["check"].rsplit(" ", 1)[-1]
        kinds.setdefault(k, [0, 0])[0 if r.get("ok") else 1] += 1
    worst = max((r.get("max_abs_diff") or 0.0 for r in results), default=0.0)
    for r in results:
        if "ratio_to_base" in r:
            print(f"{r['check']}: mean ms {r['mean_ms']}\n  ratio to base {r['ratio_to_base']}")
    print(f"checks by kind (passed, failed): {kinds}; largest max_abs_diff {worst:.3g}; "
          f"{report['secs']} s")
    for r in bad:
        print(f"FAIL {r['check']}: rc {r.get('rc')} ep {r.get('ep')}: {r.get('error') or r.get('stderr')}")
    if a.out:
        json.dump(report, open(a.out, "w"), indent=1)
    print("PASS" if not bad else f"{len(bad)} of {len(results)} checks failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
