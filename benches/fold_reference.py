"""The "Python onnx" reference for `onnx-lora fold`: what a hand-written merge script does.

    python benches/fold_reference.py MODEL.onnx ADAPTER_DIR OUT.onnx

Loads the model with its external data (onnx.load), reads the PEFT adapter
(adapter_config.json + adapter_model.safetensors, parsed with numpy so only onnx and numpy are
needed), finds each adapted MatMul through the dynamo exporter's `pkg.torch.onnx.name_scopes`
metadata, adds s * (B @ A) transposed to the [in, out] weight, and saves with every large
initializer in one external data file `OUT.onnx.data`. Plain LoRA on MatMul weights only (what
`cargo run --release --bin bench` generates); it is a timing reference, not a general tool.
"""

import ast
import json
import os
import struct
import sys

import numpy as np
import onnx
from onnx import numpy_helper

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
PREFIX = "base_model.model."
ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data, dtype=ST_DTYPES[info["dtype"]], count=(end - start) // np.dtype(ST_DTYPES[info["dtype"]]).itemsize, offset=base + start)
        out[key] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def module_of(node):
    for p in node.metadata_props:
        if p.key == NAME_SCOPES:
            scopes = ast.literal_eval(p.value)
            if len(scopes) >= 2:
                return scopes[-2]
    return None


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model_path, adapter_dir, out_path = sys.argv[1:]
    model = onnx.load(model_path)  # loads external data into memory
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    r = cfg["r"]
    alpha = cfg["lora_alpha"]
    scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)

    inits = {t.name: t for t in model.graph.initializer}
    folded = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        module = module_of(node)
        a_key = f"{PREFIX}{module}.lora_A.weight"
        b_key = f"{PREFIX}{module}.lora_B.weight"
        if module is None or a_key not in tensors:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init)  # [in, out]
        a, b = tensors[a_key], tensors[b_key]  # (r, in), (out, r)
        merged = (w.astype(np.float32) + scale * (a.T @ b.T)).astype(w.dtype)
        init.CopyFrom(numpy_helper.from_array(merged, init.name))
        folded += 1

    onnx.save_model(
        model,
        out_path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=os.path.basename(out_path) + ".data",
        size_threshold=1024,
    )
    print(f"folded {folded} weights into {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
