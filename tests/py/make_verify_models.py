"""Writes the models and data the `verify` tests use, into OUT_DIR:

  mlp.onnx          fp32: word + token-type embeddings (Gather; the type ids go through a Cast),
                    masked, MatMul+Add+Relu, MatMul+Add; outputs `logits` and `hidden`;
                    dims `batch` and `sequence` are symbolic
  mlp_perturbed.onnx  the same with one weight element (the first output bias) moved by 1e-2
  mlp_fp16.onnx     the same in float16 (weights and outputs)
  mlp_single.onnx   only the `logits` output
  inputs.npz        feeds (input_ids, token_type_ids, attention_mask) for batch 2, sequence 5
  expected.npz      onnxruntime's outputs of mlp.onnx on inputs.npz
  wrong.npz         expected.npz with logits moved by 0.5
  logits.npy        onnxruntime's logits of mlp_single.onnx on inputs.npz
  det.onnx          a Det node: onnxruntime runs it, tract does not implement it
  mlp_renamed.onnx  mlp.onnx with token_type_ids named segment_ids
  mlp_int32.onnx    mlp.onnx taking input_ids as int32
  mlp_dims.onnx     mlp.onnx with its symbolic dims named N and L instead of batch and sequence
  mlp_keepio.onnx   mlp.onnx converted to float16 by onnxruntime's converter with
                    keep_io_types=True: float16 weights and compute, float32 outputs
  id_int64.onnx     Identity on int64 [n] (y = x); id_float.onnx the same on float32
  no_outputs.onnx   a graph with an Identity node and no outputs
  dangling.onnx     a graph output no node makes (`zz`)

Usage: make_verify_models.py OUT_DIR
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

VOCAB, TYPES, D, H, O = 50, 2, 16, 32, 8


def weights(dtype):
    rng = np.random.default_rng(1234)
    w = {
        "word_emb": rng.standard_normal((VOCAB, D)),
        "type_emb": rng.standard_normal((TYPES, D)),
        "w1": rng.standard_normal((D, H)) / np.sqrt(D),
        "b1": rng.standard_normal(H) * 0.1,
        "w2": rng.standard_normal((H, O)) / np.sqrt(H),
        "b2": rng.standard_normal(O) * 0.1,
    }
    return {k: v.astype(dtype) for k, v in w.items()}


def model(dtype, perturb=False, outputs=("logits", "hidden"), types="token_type_ids",
          ids_type=TensorProto.INT64, dims=("batch", "sequence")):
    w = weights(dtype)
    if perturb:
        w["b2"][0] += dtype(1e-2)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Gather", ["word_emb", "input_ids"], ["we"]),
        helper.make_node("Cast", [types], ["tt32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["type_emb", "tt32"], ["te"]),
        helper.make_node("Add", ["we", "te"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=elem),
        helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
    ]
    ids = lambda n, t=TensorProto.INT64: helper.make_tensor_value_info(n, t, list(dims))
    shapes = {"logits": O, "hidden": H}
    outs = [helper.make_tensor_value_info(o, elem, [*dims, shapes[o]]) for o in outputs]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"))
    graph = helper.make_graph(
        nodes, "mlp", [ids("input_ids", ids_type), ids(types), ids("attention_mask")], outs, inits
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def feeds():
    rng = np.random.default_rng(7)
    mask = np.ones((2, 5), dtype=np.int64)
    mask[1, 3:] = 0
    return {
        "input_ids": rng.integers(0, VOCAB, (2, 5)).astype(np.int64),
        "token_type_ids": rng.integers(0, TYPES, (2, 5)).astype(np.int64),
        "attention_mask": mask,
    }


def run(path, f):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, f)))


def main(out):
    os.makedirs(out, exist_ok=True)
    p = lambda n: os.path.join(out, n)
    onnx.save(model(np.float32), p("mlp.onnx"))
    onnx.save(model(np.float32, perturb=True), p("mlp_perturbed.onnx"))
    onnx.save(model(np.float16), p("mlp_fp16.onnx"))
    onnx.save(model(np.float32, outputs=("logits",)), p("mlp_single.onnx"))
    onnx.save(model(np.float32, types="segment_ids"), p("mlp_renamed.onnx"))
    onnx.save(model(np.float32, ids_type=TensorProto.INT32), p("mlp_int32.onnx"))
    onnx.save(model(np.float32, dims=("N", "L")), p("mlp_dims.onnx"))
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(model(np.float32), keep_io_types=True), p("mlp_keepio.onnx"))
    f = feeds()
    np.savez(p("inputs.npz"), **f)
    expected = run(p("mlp.onnx"), f)
    np.savez(p("expected.npz"), **expected)
    wrong = dict(expected)
    wrong["logits"] = wrong["logits"] + np.float32(0.5)
    np.savez(p("wrong.npz"), **wrong)
    np.save(p("logits.npy"), run(p("mlp_single.onnx"), f)["logits"])
    det = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
    )
    det = helper.make_model(det, opset_imports=[helper.make_opsetid("", 17)])
    det.ir_version = 8
    onnx.save(det, p("det.onnx"))
    def identity(elem, name, outputs=True, extra_output=None):
        g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            name,
            [helper.make_tensor_value_info("x", elem, ["n"])],
            ([helper.make_tensor_value_info("y", elem, ["n"])] if outputs else [])
            + ([helper.make_tensor_value_info(extra_output, elem, ["n"])] if extra_output else []),
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m
    onnx.save(identity(TensorProto.INT64, "id_int64"), p("id_int64.onnx"))
    onnx.save(identity(TensorProto.FLOAT, "id_float"), p("id_float.onnx"))
    onnx.save(identity(TensorProto.FLOAT, "no_outputs", outputs=False), p("no_outputs.onnx"))
    onnx.save(identity(TensorProto.FLOAT, "dangling", extra_output="zz"), p("dangling.onnx"))
    # The fp16 model must run on onnxruntime's CPU too (the tests compare it with fp32).
    run(p("mlp_fp16.onnx"), f)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
