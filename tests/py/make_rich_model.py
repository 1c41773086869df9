"""Writes a spec-valid model that uses fields exporters rarely set, to prove convert keeps them:
training_info, local functions, sparse initializers, metadata on model/graph/node/value_info/
tensor, doc strings, quantization annotations, a subgraph (If) with its own initializer, and
an external-data tensor.

Usage: make_rich_model.py OUT_DIR  (writes OUT_DIR/rich.onnx and OUT_DIR/rich.onnx.data)
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def entry(k, v):
    return onnx.StringStringEntryProto(key=k, value=v)


def main(out_dir):
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "W")
    w.doc_string = "a weight"
    w.metadata_props.append(entry("origin", "test"))
    small = numpy_helper.from_array(np.ones(2, dtype=np.float32), "small")
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "S"),
        numpy_helper.from_array(np.array([1, 5], dtype=np.int64), "S_idx"),
        [8],
    )
    then_g = helper.make_graph(
        [helper.make_node("Add", ["y", "c_then"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.full(8, 2.0, dtype=np.float32), "c_then")],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["z2"])],
        "else",
        [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)],
    )
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="/m/fc/MatMul", doc_string="fc")
    mm.metadata_props.append(entry("pkg.torch.onnx.name_scopes", "['', 'm', 'm.fc', 'linear']"))
    cond = helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [True]))
    iff = helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="branch")
    fn_call = helper.make_node("AddTwice", ["out", "small"], ["out2"], domain="local")
    graph = helper.make_graph(
        [mm, cond, iff, fn_call],
        "rich",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["batch", 8])],
        initializer=[w, small],
        sparse_initializer=[sparse],
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    graph.metadata_props.append(entry("graph_key", "graph_value"))
    graph.value_info[0].metadata_props.append(entry("vi_key", "vi_value"))
    ann = onnx.TensorAnnotation(tensor_name="W")
    ann.quant_parameter_tensor_names.append(entry("SCALE_TENSOR", "small"))
    graph.quantization_annotation.append(ann)
    fn = helper.make_function(
        "local",
        "AddTwice",
        ["a", "b"],
        ["c"],
        [helper.make_node("Add", ["a", "b"], ["t"]), helper.make_node("Add", ["t", "b"], ["c"])],
        [helper.make_opsetid("", 17)],
        doc_string="function doc",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
        producer_name="make_rich_model",
        producer_version="1",
        doc_string="model doc",
        model_version=7,
        domain="test.onnx-lora",
    )
    model.metadata_props.append(entry("model_key", "model_value"))
    init_g = helper.make_graph(
        [helper.make_node("Constant", [], ["W_init"], value=numpy_helper.from_array(np.zeros((8, 8), np.float32)))],
        "init",
        [],
        [helper.make_tensor_value_info("W_init", TensorProto.FLOAT, [8, 8])],
    )
    algo_g = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["W_new"])],
        "algo",
        [],
        [helper.make_tensor_value_info("W_new", TensorProto.FLOAT, [8, 8])],
    )
    ti = onnx.TrainingInfoProto(initialization=init_g, algorithm=algo_g)
    ti.initialization_binding.append(entry("W", "W_init"))
    ti.update_binding.append(entry("W", "W_new"))
    model.training_info.append(ti)
    onnx.checker.check_model(model)
    path = os.path.join(out_dir, "rich.onnx")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="rich.onnx.data", size_threshold=64)


if __name__ == "__main__":
    main(sys.argv[1])
