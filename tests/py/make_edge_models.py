"""Small models for the cases exporters rarely give us, written with onnx.helper:

  linear.onnx      y = x @ W  (MatMul, W [8, 4] named fc.weight... via node name /fc/MatMul)
  nbits.onnx       MatMulNBits (com.microsoft) on module /fc/MatMulNBits (quantized base)
  dq.onnx          DequantizeLinear(W_q) -> MatMul on /fc/MatMul (quantized base)
  grouped.onnx     Conv with group=2 on /conv/Conv
  shared.onnx      one initializer W feeding /a/MatMul and /b/MatMul (deduplicated weights)
  shared_bias.onnx /a/MatMul and /b/MatMul, each followed by an Add of the same bias tensor
  tied.onnx        one table E [16, 8] feeding /embed/Gather and /lm_head/Gemm (transB=1):
                   tied embeddings stored once
  tied_nbits.onnx  /embed/Gather on E [16, 8] and a 4-bit /lm_head/MatMulNBits head (K=8, N=16)
  subgraph.onnx    /a/MatMul, then an If whose then-branch holds /b/MatMul with its own weight
  anon.onnx        a Gather and two MatMuls on nodes without names, weights named W0, W1, E
                   (nothing gives a module path)
  linear_bias_fp16.onnx  float16 y = x @ W + b on /fc/MatMul and /fc/Add
  funcs.onnx       two calls of a model-local function 'Block' (a MatMul on its weight
                   argument) on main-graph weights blocks.0.w / blocks.1.w, as TorchScript's
                   export_modules_as_functions writes
  huge_output.onnx linear.onnx with a second output `ones`, 2^27 float32 ones (512 MiB) from
                   a ConstantOfShape: running it needs more memory than a tight limit allows
  norms.onnx       LayerNormalization on /a/norm, /b/norm (sharing one bias tensor `beta`, as an
                   exporter deduplicates equal values; /a/norm reads both through Identity
                   nodes) and /c/norm (no bias), all three sharing the scale `gamma`; outputs
                   ya, yb, yc
  encoder.onnx     y = (x @ W0) @ Wq on /layers.0/fc1/MatMul and /layers.0/self_attn/q_proj/MatMul:
                   one file of an encoder-decoder export, whose paths lack `model.encoder.`
  decoder.onnx     the same layers, plus an input encoder_hidden_states added to y: the
                   decoder's file of such an export
  decoder_memory.onnx  the same, its encoder states an input `memory` that a cross-attention
                   k_proj reads alone
  encoder_if.onnx  encoder.onnx with an If on a bool input `flag` between its two layers
  merged.onnx      an If on the bool input `use_cache_branch` whose two bodies each hold a
                   /fc/MatMul on the outer graph's W (a merged decoder's with / without past);
                   merged_other.onnx: its with-past body reads another weight, W2
  merged_packed.onnx  a merged decoder layer whose two If bodies compute q/k/v differently, as
                   onnxruntime's O2 optimization leaves Whisper's: `with_past` one
                   com.microsoft.Attention on the packed Wqkv [8, 24], `without_past` separate
                   /layers.0/self_attn/{q,k,v}_proj MatMuls summed; both end in
                   /layers.0/self_attn/out_proj/MatMul (x [1, 4, 8] -> y [1, 4, 8])
  merged_packed_both.onnx  the same layer with both bodies fused: an Attention on the outer
                   graph's one Wqkv in each
  cycle.onnx       /fc/MatMul's weight read through an Identity that feeds itself (malformed)
  long_name.onnx   linear.onnx with a 70000-character weight name
  written_twice.onnx  linear.onnx with its node listed twice (invalid: y written twice)
  init_twice.onnx  linear.onnx with two initializers W of different values (invalid)
  param_matmul.onnx  /fc/MatMul reading the square fc.weight [8, 8] as stored (x @ W);
                   param_renamed.onnx: the same weight named W8
  init_written.onnx  linear.onnx with an initializer y, which its node writes (invalid)
  opset6.onnx      linear.onnx at opset 6; ir3.onnx: at IR version 3 (W also a graph input)
  int_weight.onnx  an int32 MatMul on /fc/MatMul
  nbits_float.onnx, dq_float.onnx   the quantized models with their weights dequantized (float
                   twins: a branch beside the quantized base must compute what folding into
                   the float twin does)
  gemm_half.onnx, gemm_one.onnx  one layer /fc/Gemm (transB=1, bias C) as alpha = 0.5 on the
                   doubled weight and as alpha = 1: the same function
  qkv_nbits.onnx   a 4-bit MatMulNBits /layers.0/attn/qkv_proj/MatMulNBits packing q, k, v (4
                   wide each, K=8), as a model builder's int4 export; qkv_nbits_float.onnx its
                   float twin (/layers.0/attn/qkv_proj/MatMul)

  if_twins.onnx    TorchScript twins in a merged decoder: module fc_1's weight equals fc's and
                   was merged into W; each If body runs /fc/MatMul + /fc/Add (fc.bias) then
                   /fc_1/MatMul + /fc_1/Add, reading fc_1.bias through an Identity of fc.bias at
                   the top of the main graph (x [2, 8] -> y [2, 8]); if_twins_nobias.onnx the
                   same without biases (nothing the export names tells fc_1 from a later call)
  collide.onnx, collide_own_first.onnx  a bias-less fc called twice beside a module fc_1 with
                   a bias, all on one merged W, TorchScript scoping fc's second call like the
                   module: /fc/MatMul, /fc_1/MatMul (fc's call) then /fc_1/MatMul_1 + /fc_1/Add
                   (fc_1.bias); and the module's nodes first (/fc_1/MatMul + /fc_1/Add, then
                   fc's call /fc_1/MatMul_1)
  distinct.onnx, distinct_nobias.onnx  the same collision with module fc_1 on a weight of its
                   own (fc's call /fc_1/MatMul, then the module's /fc_1/MatMul_1, with and
                   without its bias)
  *_renamed.onnx   each of these with module fc_1 named proj (its nodes and bias): the same
                   function with nothing to tell apart, the reference for them
  collide_nobias.onnx  the collision with no bias anywhere (/fc/MatMul, /fc_1/MatMul,
                   /fc_1/MatMul_1 on one W): nothing tells fc_1 from fc's call;
                   collide_nobias_prefixed.onnx the same under a wrapper scope /m/
  main_if_twins.onnx  fc's call /fc_1/MatMul in the main graph and a bias-less /fc_1/MatMul in
                   an If's then-branch, on one W: both may run in one pass
  main_if_module.onnx  fc's call /fc_1/MatMul in the main graph and module fc_1's
                   /fc_1/MatMul + /fc_1/Add (fc_1.bias) in an If's else-branch, on one W (one
                   node name in two graphs); main_if_module_renamed.onnx its reference
  main_if_calls.onnx  /fc/MatMul in the main graph and /fc_1/MatMul (its later call) in both
                   bodies of an If, on one W: two calls per run
  emb_collide_nobias.onnx  collide_nobias's scopes on EmbedLayerNormalization nodes reading one
                   word embedding table E
  mmi_beside_deeper.onnx  mmi.onnx's layer scoped fc_1 beside a float /blocks.0/fc_1/MatMul
  union_scopes.onnx  collide_nobias on fc.weight beside a module blocks.0.fc_1 of its own
  union_scopes_wrapped.onnx  the same under a wrapper scope /m/
  deep_call_wrapped.onnx  under /m/: a module fc_1 of its own and blocks.0.fc called twice
                   (/m/blocks.0/fc_1/MatMul on blocks.0.fc's weight)
  if_copies_calls.onnx  an If whose bodies each hold /fc/MatMul and /fc_1/MatMul on a copy of
                   the weight of their own
  later_call_first.onnx  /fc_1/MatMul (fc's later call) listed before /fc/MatMul, one W
  later_call_in_loop_first.onnx  the same with /fc_1/MatMul in a Loop listed first
  collide_nobias_reordered.onnx  collide_nobias with the scope fc_1's nodes listed first
  if_local_copy_{then,else}_first.onnx  /fc/MatMul in both bodies of an If, the else one on a
                   body-local equal copy, then /fc_1/MatMul on W; either body attribute first
  if_then_main_call.onnx  /fc/MatMul in both bodies of an If, then /fc_1/MatMul (its later call)
                   in the main graph, on one W: the main graph lists the second call first
  nested_stacks{,_wrapped}.onnx  layers.0.fc1 beside encoder.layers.0.fc1 (under /m/ when wrapped)
  conv_reflect{,_outside}.onnx  a Conv after a reflect Pad in its own scope (padding_mode), and
                   after one in its parent's
  many_calls.onnx  one W called 40 times in a chain (/fc/MatMul, /fc_1/MatMul, ... /fc_39/MatMul)

Usage: make_edge_models.py OUT_DIR
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)


def save(graph, path, opset=17, extra_opsets=()):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 10
    onnx.save(m, path)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def main(out):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
                           "linear", [x], [y], [numpy_helper.from_array(f32(8, 4), "W")]),
         os.path.join(out, "linear.onnx"))
    # invalid: the node listed twice, both writing y (onnxruntime and the checker refuse it)
    twice = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    save(helper.make_graph([twice, twice], "linear", [x], [y], [numpy_helper.from_array(f32(8, 4), "W")]),
         os.path.join(out, "written_twice.onnx"))
    # a square parameter a MatMul reads as stored (x @ W, not a Linear's x @ W.T), named
    # after it: fc.weight [8, 8]
    xs = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    ys = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")],
                           "param", [xs], [ys], [numpy_helper.from_array(f32(8, 8), "fc.weight")]),
         os.path.join(out, "param_matmul.onnx"))
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W8"], ["y"], name="/fc/MatMul")],
                           "param", [xs], [ys], [numpy_helper.from_array(f32(8, 8), "W8")]),
         os.path.join(out, "param_renamed.onnx"))
    # invalid: W listed twice with different values (onnxruntime takes the first, tract the
    # last); and an initializer y that the node also writes
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
                           "linear", [x], [y], [numpy_helper.from_array(f32(8, 4), "W"),
                                                numpy_helper.from_array(f32(8, 4), "W")]),
         os.path.join(out, "init_twice.onnx"))
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
                           "linear", [x], [y], [numpy_helper.from_array(f32(8, 4), "W"),
                                                numpy_helper.from_array(f32(2, 4), "y")]),
         os.path.join(out, "init_written.onnx"))

    # MatMulNBits: K=8, N=4, bits=4, block_size=16 -> B uint8 [N, 1, 8], scales [N]
    packed = rng.integers(0, 255, (4, 1, 8), dtype=np.uint8)
    scales = np.array([0.1, 0.2, 0.05, 0.3], np.float32)
    b = numpy_helper.from_array(packed, "Wq")
    sc = numpy_helper.from_array(scales, "scales")
    # 4-bit values, low nibble first, zero point 8; the first K = 8 of the block are used.
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(4, 16)[:, :8].astype(np.float32)
    w_nbits = ((nibbles - 8.0) * scales[:, None]).T.astype(np.float32)  # [K, N]
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
                           "nbits_float", [x], [y], [numpy_helper.from_array(w_nbits, "W")]),
         os.path.join(out, "nbits_float.onnx"))
    nb = helper.make_node("MatMulNBits", ["x", "Wq", "scales"], ["y"], name="/fc/MatMulNBits",
                          domain="com.microsoft", K=8, N=4, bits=4, block_size=16)
    save(helper.make_graph([nb], "nbits", [x], [y], [b, sc]), os.path.join(out, "nbits.onnx"),
         extra_opsets=[helper.make_opsetid("com.microsoft", 1)])

    wq_values = rng.integers(-100, 100, (8, 4), dtype=np.int8)
    wq = numpy_helper.from_array(wq_values, "Wq")
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
                           "dq_float", [x], [y], [numpy_helper.from_array(wq_values.astype(np.float32) * np.float32(0.01), "W")]),
         os.path.join(out, "dq_float.onnx"))
    s = numpy_helper.from_array(np.array(0.01, np.float32), "s")
    dq = helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], name="/fc/DequantizeLinear")
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    save(helper.make_graph([dq, mm], "dq", [x], [y], [wq, s]), os.path.join(out, "dq.onnx"))
    # A BatchNorm folded into the Conv before it, as torch's exporters write it. TorchScript:
    # weight and bias both constants it computed (onnx::Conv_N). dynamo: the conv's parameter
    # name, the node named after the BatchNorm and marked by the optimizer rule. The control:
    # a computed weight beside the conv's own bias (weight normalization), which is no fusion.
    xb = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])
    yb = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    def conv_bn(w, b, name, meta=()):
        n = helper.make_node("Conv", ["x", w, b], ["y"], name=name, pads=[1, 1, 1, 1])
        for k, v in meta:
            n.metadata_props.add(key=k, value=v)
        return helper.make_graph([n], "conv_bn", [xb], [yb], [numpy_helper.from_array(f32(4, 3, 3, 3), w),
                                                           numpy_helper.from_array(f32(4), b)])
    save(conv_bn("onnx::Conv_10", "onnx::Conv_11", "/conv/Conv"), os.path.join(out, "conv_bn_ts.onnx"))
    save(conv_bn("conv.weight", "conv.weight_bias", "node_Conv_18",
                 [("pkg.onnxscript.rewriter.rule_name", "FuseBatchNormIntoConv, RemoveOptionalBiasFromConv"),
                  ("pkg.torch.onnx.name_scopes", "['', 'bn', '_native_batch_norm_legit_no_training']")]),
         os.path.join(out, "conv_bn_dynamo.onnx"))
    save(conv_bn("onnx::Conv_10", "conv.bias", "/conv/Conv"), os.path.join(out, "conv_wn_ts.onnx"))
    # A conv padding its input by reflection (torch's padding_mode="reflect": a Pad in the
    # conv's own scope), and one padded by its parent (F.pad in a module above: a Pad outside).
    xp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])
    def reflect_conv(pad_name):
        pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
        return helper.make_graph(
            [helper.make_node("Pad", ["x", "pads"], ["xp"], name=pad_name, mode="reflect"),
             helper.make_node("Conv", ["xp", "conv.weight"], ["y"], name="/conv/Conv")],
            "reflect", [xp], [yb], [numpy_helper.from_array(f32(4, 3, 3, 3), "conv.weight"), pads])
    save(reflect_conv("/conv/Pad"), os.path.join(out, "conv_reflect.onnx"))
    save(reflect_conv("/Pad"), os.path.join(out, "conv_reflect_outside.onnx"))
    # One table that two call sites read (T5's `shared`, which is encoder.embed_tokens and
    # decoder.embed_tokens): the Gathers are named after the call sites, the table after it.
    ids_e = helper.make_tensor_value_info("enc_ids", TensorProto.INT64, [1, 3])
    ids_d = helper.make_tensor_value_info("dec_ids", TensorProto.INT64, [1, 3])
    ye = helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3, 8])
    yd = helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 3, 8])
    save(helper.make_graph([helper.make_node("Gather", ["shared.weight", "enc_ids"], ["e"], name="/encoder/embed_tokens/Gather"),
                            helper.make_node("Gather", ["shared.weight", "dec_ids"], ["d"], name="/decoder/embed_tokens/Gather")],
                           "shared_table", [ids_e, ids_d], [ye, yd], [numpy_helper.from_array(f32(16, 8), "shared.weight")]),
         os.path.join(out, "shared_table.onnx"))
    # MatMulInteger with its int8 input and int32 output as the graph's: no float values.
    xq = helper.make_tensor_value_info("xq", TensorProto.INT8, [2, 8])
    yi = helper.make_tensor_value_info("yi", TensorProto.INT32, [2, 4])
    mmi = helper.make_node("MatMulInteger", ["xq", "Wq"], ["yi"], name="/fc/MatMul_quant")
    save(helper.make_graph([mmi], "mmi", [xq], [yi], [wq]), os.path.join(out, "mmi.onnx"))
    # the same layer scoped fc_1 beside a float blocks.0.fc_1 (a deeper module, same suffix)
    mmi.name = "/fc_1/MatMul_quant"
    deeper = helper.make_node("MatMul", ["x", "W"], ["y"], name="/blocks.0/fc_1/MatMul")
    save(helper.make_graph([mmi, deeper], "mmi_deeper", [xq, x], [yi, y],
                           [wq, numpy_helper.from_array(f32(8, 4), "W")]),
         os.path.join(out, "mmi_beside_deeper.onnx"))

    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])
    yo = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    conv = helper.make_node("Conv", ["x", "W"], ["y"], name="/conv/Conv", group=2, pads=[1, 1, 1, 1])
    save(helper.make_graph([conv], "grouped", [xi], [yo], [numpy_helper.from_array(f32(4, 2, 3, 3), "W")]),
         os.path.join(out, "grouped.onnx"))

    # a plain 3x3 conv without bias; its output's width (5) is not its channel count (3)
    xc = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 5])
    yc = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 5])
    conv_nb = helper.make_node("Conv", ["x", "W"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1])
    save(helper.make_graph([conv_nb], "conv_nobias", [xc], [yc], [numpy_helper.from_array(f32(3, 2, 3, 3), "W")]),
         os.path.join(out, "conv_nobias.onnx"))

    ya = helper.make_tensor_value_info("ya", TensorProto.FLOAT, [2, 4])
    yb = helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 4])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["ya"], name="/a/MatMul"),
                            helper.make_node("MatMul", ["x", "W"], ["yb"], name="/b/MatMul")],
                           "shared", [x], [ya, yb], [numpy_helper.from_array(f32(8, 4), "W")]),
         os.path.join(out, "shared.onnx"))

    save(helper.make_graph([helper.make_node("MatMul", ["x", "Wa"], ["ma"], name="/a/MatMul"),
                            helper.make_node("Add", ["ma", "bias"], ["ya"], name="/a/Add"),
                            helper.make_node("MatMul", ["x", "Wb"], ["mb"], name="/b/MatMul"),
                            helper.make_node("Add", ["mb", "bias"], ["yb"], name="/b/Add")],
                           "shared_bias", [x], [ya, yb],
                           [numpy_helper.from_array(f32(8, 4), "Wa"), numpy_helper.from_array(f32(8, 4), "Wb"),
                            numpy_helper.from_array(f32(4), "bias")]),
         os.path.join(out, "shared_bias.onnx"))

    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 16])
    gather = helper.make_node("Gather", ["E", "ids"], ["h3"], name="/embed/Gather")
    flat = helper.make_node("Reshape", ["h3", "shape"], ["h"], name="/embed/Reshape")
    shape = numpy_helper.from_array(np.array([3, 8], np.int64), "shape")
    head = helper.make_node("Gemm", ["h", "E"], ["logits"], name="/lm_head/Gemm", transB=1)
    save(helper.make_graph([gather, flat, head], "tied", [ids], [logits],
                           [numpy_helper.from_array(f32(16, 8), "E"), shape]),
         os.path.join(out, "tied.onnx"))
    # untied: lm_head has its own values, equal to the table only at rows 2 and 5 (both zero, like
    # untrained reserved tokens)
    e, h = f32(16, 8), f32(16, 8)
    e[[2, 5]] = 0
    h[[2, 5]] = 0
    head_u = helper.make_node("Gemm", ["h", "H"], ["logits"], name="/lm_head/Gemm", transB=1)
    save(helper.make_graph([gather, flat, head_u], "untied", [ids], [logits],
                           [numpy_helper.from_array(e, "E"), numpy_helper.from_array(h, "H"), shape]),
         os.path.join(out, "untied_equal_rows.onnx"))
    hq = rng.integers(0, 255, (16, 1, 8), dtype=np.uint8)
    head_q = helper.make_node("MatMulNBits", ["h", "Hq", "Hs"], ["logits"], name="/lm_head/MatMulNBits",
                              domain="com.microsoft", K=8, N=16, bits=4, block_size=16)
    save(helper.make_graph([gather, flat, head_q], "tied_nbits", [ids], [logits],
                           [numpy_helper.from_array(f32(16, 8), "E"), shape,
                            numpy_helper.from_array(hq, "Hq"),
                            numpy_helper.from_array(np.full(16, 0.1, np.float32), "Hs")]),
         os.path.join(out, "tied_nbits.onnx"), extra_opsets=[helper.make_opsetid("com.microsoft", 1)])

    # /a/MatMul in the main graph, then an If whose then-branch runs /b/MatMul on it with the
    # body's own weight: branches on both need the body found again after the main graph changed
    x8 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "Wb"], ["t"], name="/b/MatMul")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(f32(8, 8), "Wb")])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e"], name="/keep/Identity")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "Wa"], ["h"], name="/a/MatMul"),
                            helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g,
                                             name="/gate/If")],
                           "subgraph", [x8, cond], [yi], [numpy_helper.from_array(f32(8, 8), "Wa")]),
         os.path.join(out, "subgraph.onnx"))

    # No names anywhere: no module paths for any candidate
    ids2 = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])
    ya = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])
    save(helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["h0"]),
                            helper.make_node("MatMul", ["h0", "W0"], ["h1"]),
                            helper.make_node("MatMul", ["h1", "W1"], ["y"])],
                           "anon", [ids2], [ya],
                           [numpy_helper.from_array(f32(16, 8), "E"), numpy_helper.from_array(f32(8, 8), "W0"),
                            numpy_helper.from_array(f32(8, 4), "W1")]),
         os.path.join(out, "anon.onnx"))

    xh = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])
    yh = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"], name="/fc/MatMul"),
                            helper.make_node("Add", ["h", "b"], ["y"], name="/fc/Add")],
                           "linear_bias_fp16", [xh], [yh],
                           [numpy_helper.from_array(f32(8, 4).astype(np.float16), "W"),
                            numpy_helper.from_array(f32(4).astype(np.float16), "b")]),
         os.path.join(out, "linear_bias_fp16.onnx"))

    block = helper.make_function("local", "Block", ["x", "w"], ["y"],
                                 [helper.make_node("MatMul", ["x", "w"], ["y"], name="/MatMul")],
                                 [helper.make_opsetid("", 17)])
    xf = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    yf = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    g = helper.make_graph([helper.make_node("Block", ["x", "blocks.0.w"], ["h"], domain="local", name="/blocks.0/Block"),
                           helper.make_node("Block", ["h", "blocks.1.w"], ["y"], domain="local", name="/blocks.1/Block")],
                          "funcs", [xf], [yf],
                          [numpy_helper.from_array(f32(8, 8), "blocks.0.w"),
                           numpy_helper.from_array(f32(8, 8), "blocks.1.w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[block])
    m.ir_version = 10
    onnx.save(m, os.path.join(out, "funcs.onnx"))

    x8 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    norm_outs = [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [2, 8]) for k in "abc"]
    # /a/norm reads both through Identity nodes, as TorchScript exports deduplicated tensors
    save(helper.make_graph([helper.make_node("Identity", ["gamma"], ["gamma_a"], name="/Identity"),
                            helper.make_node("Identity", ["beta"], ["beta_a"], name="/Identity_1"),
                            helper.make_node("LayerNormalization", ["x", "gamma_a", "beta_a"], ["ya"],
                                             name="/a/norm/LayerNormalization"),
                            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["yb"],
                                             name="/b/norm/LayerNormalization"),
                            helper.make_node("LayerNormalization", ["x", "gamma"], ["yc"],
                                             name="/c/norm/LayerNormalization")],
                           "norms", [x8], norm_outs,
                           [numpy_helper.from_array(f32(8), "gamma"), numpy_helper.from_array(f32(8), "beta")]),
         os.path.join(out, "norms.onnx"))

    enc_y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])

    def part_file(name, inputs=(), tail=(), weights=()):
        """layers.0.fc1 then layers.0.self_attn.q_proj on x (q, or y without `tail` nodes)."""
        q_out = "q" if tail else "y"
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="/layers.0/fc1/MatMul"),
                 helper.make_node("MatMul", ["h", "Wq"], [q_out], name="/layers.0/self_attn/q_proj/MatMul"),
                 *tail]
        save(helper.make_graph(nodes, name, [x8, *inputs], [enc_y],
                               [numpy_helper.from_array(f32(8, 8), n) for n in ("W0", "Wq", *weights)]),
             os.path.join(out, f"{name}.onnx"))

    part_file("encoder")
    # the same layers in a decoder's file: it takes the encoder's states (added to its output)
    states = helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, [2, 8])
    part_file("decoder", [states], [helper.make_node("Add", ["q", "encoder_hidden_states"], ["y"], name="/Add")])
    # a decoder whose encoder-states input has another name (nn.Transformer's `memory`): its
    # cross-attention's key projection reads it alone
    memory = helper.make_tensor_value_info("memory", TensorProto.FLOAT, [2, 8])
    # an encoder with an If between its layers (the bodies read fc1's output from the main graph)
    t8 = helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 8])
    bodies = [helper.make_graph([helper.make_node(op, ["h"], ["t"])], name, [], [t8])
              for op, name in (("Identity", "then"), ("Neg", "else"))]
    flag_in = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W0"], ["h"], name="/layers.0/fc1/MatMul"),
                            helper.make_node("If", ["flag"], ["t"], name="/If", then_branch=bodies[0],
                                             else_branch=bodies[1]),
                            helper.make_node("MatMul", ["t", "Wq"], ["y"], name="/layers.0/self_attn/q_proj/MatMul")],
                           "encoder_if", [x8, flag_in], [enc_y],
                           [numpy_helper.from_array(f32(8, 8), n) for n in ("W0", "Wq")]),
         os.path.join(out, "encoder_if.onnx"))
    part_file("decoder_memory", [memory],
              [helper.make_node("MatMul", ["memory", "Wk"], ["k"], name="/layers.0/encoder_attn/k_proj/MatMul"),
               helper.make_node("Add", ["q", "k"], ["y"], name="/Add")], ["Wk"])

    body_y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    bodies = [helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
                                name, [], [body_y]) for name in ("with_past", "without_past")]
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    save(helper.make_graph([helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                                             then_branch=bodies[0], else_branch=bodies[1])],
                           "merged", [x, flag], [y], [numpy_helper.from_array(f32(8, 4), "W")]),
         os.path.join(out, "merged.onnx"))
    # the same, but the with-past body reads another weight
    other = [helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["y"], name="/fc/MatMul")],
                               "with_past", [], [body_y]), bodies[1]]
    save(helper.make_graph([helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                                             then_branch=other[0], else_branch=other[1])],
                           "merged", [x, flag], [y], [numpy_helper.from_array(f32(8, 4), "W"),
                                                      numpy_helper.from_array(f32(8, 4), "W2")]),
         os.path.join(out, "merged_other.onnx"))

    x3 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y3 = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    body_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    out_proj = helper.make_node("MatMul", ["h", "Wo"], ["y"], name="/layers.0/self_attn/out_proj/MatMul")
    fused = helper.make_graph(
        [helper.make_node("Attention", ["x", "Wqkv", "bqkv"], ["h"], name="Attention_0",
                          domain="com.microsoft", num_heads=2), out_proj],
        "with_past", [], [body_out])
    split = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"W{p}"], [p], name=f"/layers.0/self_attn/{p}_proj/MatMul")
         for p in "qkv"]
        + [helper.make_node("Sum", ["q", "k", "v"], ["h"], name="/layers.0/self_attn/Sum"), out_proj],
        "without_past", [], [body_out])
    wq, wk, wv = f32(8, 8), f32(8, 8), f32(8, 8)
    save(helper.make_graph([helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                                             then_branch=fused, else_branch=split)],
                           "merged_packed", [x3, flag], [y3],
                           [numpy_helper.from_array(np.concatenate([wq, wk, wv], 1), "Wqkv"),
                            numpy_helper.from_array(np.zeros(24, np.float32), "bqkv"),
                            numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(wk, "Wk"),
                            numpy_helper.from_array(wv, "Wv"), numpy_helper.from_array(f32(8, 8), "Wo")]),
         os.path.join(out, "merged_packed.onnx"), extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    # both bodies fused, reading the one packed weight of the outer graph
    fused_too = helper.make_graph(list(fused.node), "without_past", [], [body_out])
    save(helper.make_graph([helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                                             then_branch=fused, else_branch=fused_too)],
                           "merged_packed_both", [x3, flag], [y3],
                           [numpy_helper.from_array(np.concatenate([wq, wk, wv], 1), "Wqkv"),
                            numpy_helper.from_array(np.zeros(24, np.float32), "bqkv"),
                            numpy_helper.from_array(np.eye(8, dtype=np.float32), "Wo")]),
         os.path.join(out, "merged_packed_both.onnx"), extra_opsets=[helper.make_opsetid("com.microsoft", 1)])

    def linear(w_name="W", dtype=TensorProto.FLOAT, w=None, extra_inputs=()):
        xi = helper.make_tensor_value_info("x", dtype, [2, 8])
        yi = helper.make_tensor_value_info("y", dtype, [2, 4])
        w = f32(8, 4) if w is None else w
        return helper.make_graph([helper.make_node("MatMul", ["x", w_name], ["y"], name="/fc/MatMul")],
                                 "linear", [xi, *extra_inputs], [yi], [numpy_helper.from_array(w, w_name)])

    g = linear("W")
    g.node.insert(0, helper.make_node("Identity", ["z"], ["z"], name="/self"))
    g.node[1].input[1] = "z"
    save(g, os.path.join(out, "cycle.onnx"))
    save(linear("w" * 70000), os.path.join(out, "long_name.onnx"))
    save(linear(), os.path.join(out, "opset6.onnx"), opset=6)
    m3 = helper.make_model(linear(extra_inputs=[helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 4])]),
                           opset_imports=[helper.make_opsetid("", 9)])
    m3.ir_version = 3
    onnx.save(m3, os.path.join(out, "ir3.onnx"))
    save(linear(dtype=TensorProto.INT32, w=np.ones((8, 4), np.int32)), os.path.join(out, "int_weight.onnx"))

    # A second output of 2^27 ones: 512 MiB each time the model runs
    ones = helper.make_tensor_value_info("ones", TensorProto.FLOAT, [2**27])
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [1.0])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul"),
                            helper.make_node("ConstantOfShape", ["n"], ["ones"], value=fill,
                                             name="/ones/ConstantOfShape")],
                           "huge_output", [x], [y, ones],
                           [numpy_helper.from_array(f32(8, 4), "W"),
                            numpy_helper.from_array(np.array([2**27], np.int64), "n")]),
         os.path.join(out, "huge_output.onnx"))

    # A 4-bit packed q/k/v projection (K=8, N=12: q, k, v 4 wide each), as a model builder
    # writes an int4 `qkv_proj`, and its float twin.
    packed = rng.integers(0, 255, (12, 1, 8), dtype=np.uint8)
    scales = (rng.uniform(0.05, 0.3, 12)).astype(np.float32)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(12, 16)[:, :8].astype(np.float32)
    w_qkv = ((nibbles - 8.0) * scales[:, None]).T.astype(np.float32)  # [K, N]
    yq = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])
    save(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"],
                                             name="/layers.0/attn/qkv_proj/MatMul")],
                           "qkv_nbits_float", [x], [yq], [numpy_helper.from_array(w_qkv, "W")]),
         os.path.join(out, "qkv_nbits_float.onnx"))
    nb = helper.make_node("MatMulNBits", ["x", "Wq", "scales"], ["y"],
                          name="/layers.0/attn/qkv_proj/MatMulNBits", domain="com.microsoft",
                          K=8, N=12, bits=4, block_size=16)
    save(helper.make_graph([nb], "qkv_nbits", [x], [yq], [numpy_helper.from_array(packed, "Wq"),
                                                          numpy_helper.from_array(scales, "scales")]),
         os.path.join(out, "qkv_nbits.onnx"), extra_opsets=[helper.make_opsetid("com.microsoft", 1)])

    # The same layer as a Gemm that scales its stored weight by alpha = 0.5 (W stored doubled)
    # and as one with alpha = 1: one function, two encodings.
    w_fc, c_fc = f32(4, 8), f32(4)
    for name, alpha, w in [("gemm_half.onnx", 0.5, 2 * w_fc), ("gemm_one.onnx", 1.0, w_fc)]:
        gemm = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="/fc/Gemm", transB=1,
                                alpha=alpha)
        save(helper.make_graph([gemm], "gemm", [x], [y], [numpy_helper.from_array(w, "W"),
                                                          numpy_helper.from_array(c_fc, "C")]),
             os.path.join(out, name))

    twins(out)
    call_order(out)


def twins(out):
    """TorchScript's merged equal weights (see the docstring: if_twins, collide)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    w, b, b1, w1 = f32(8, 8), f32(8), f32(8), f32(8, 8)
    flag0 = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    body_y = helper.make_tensor_value_info("yy", TensorProto.FLOAT, [2, 8])
    for mod in ("fc_1", "proj"):
        tail = "" if mod == "fc_1" else "_renamed"
        for bias in (True, False):
            def body(name):
                nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul")]
                if bias:
                    nodes.append(helper.make_node("Add", ["a", "fc.bias"], ["a2"], name="/fc/Add"))
                nodes.append(helper.make_node("MatMul", ["a2" if bias else "a", "W"],
                                              ["c" if bias else "y"], name=f"/{mod}/MatMul"))
                if bias:
                    nodes.append(helper.make_node("Add", ["c", f"{mod}.bias"], ["y"], name=f"/{mod}/Add"))
                return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
            top = ([helper.make_node("Identity", ["fc.bias"], [f"{mod}.bias"], name="Identity_0")]
                   if bias else [])
            inits = [numpy_helper.from_array(w, "W")]
            if bias:
                inits.append(numpy_helper.from_array(b, "fc.bias"))
            save(helper.make_graph(top + [helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                                                              then_branch=body("with_past"),
                                                              else_branch=body("without_past"))],
                                   "merged_twins", [x, flag], [y], inits),
                 os.path.join(out, f"if_twins{'' if bias else '_nobias'}{tail}.onnx"))
        for own_first in (False, True):
            call = lambda i, o, n: helper.make_node("MatMul", [i, "W"], [o], name=n)
            own = lambda i, o, n: [helper.make_node("MatMul", [i, "W"], ["m"], name=n),
                                   helper.make_node("Add", ["m", f"{mod}.bias"], [o], name=f"/{mod}/Add")]
            first = helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul")
            if own_first:
                nodes = [first, *own("a", "b", f"/{mod}/MatMul"), call("b", "y", "/fc_1/MatMul_1" if mod == "fc_1" else "/fc_1/MatMul")]
            else:
                nodes = [first, call("a", "b", "/fc_1/MatMul"), *own("b", "y", f"/{mod}/MatMul_1" if mod == "fc_1" else f"/{mod}/MatMul")]
            save(helper.make_graph(nodes, "collide", [x], [y],
                                   [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b1, f"{mod}.bias")]),
                 os.path.join(out, f"collide{'_own_first' if own_first else ''}{tail}.onnx"))
        for bias in (True, False):
            nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul"),
                     helper.make_node("MatMul", ["a", "W"], ["b"], name="/fc_1/MatMul"),
                     helper.make_node("MatMul", ["b", "W1"], ["m" if bias else "y"],
                                      name="/fc_1/MatMul_1" if mod == "fc_1" else f"/{mod}/MatMul")]
            inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w1, "W1")]
            if bias:
                nodes.append(helper.make_node("Add", ["m", f"{mod}.bias"], ["y"], name=f"/{mod}/Add"))
                inits.append(numpy_helper.from_array(b1, f"{mod}.bias"))
            save(helper.make_graph(nodes, "distinct", [x], [y], inits),
                 os.path.join(out, f"distinct{'' if bias else '_nobias'}{tail}.onnx"))
        # fc's call in the main graph, the module in an If's else body: one node name in two
        # graphs
        then = helper.make_graph([helper.make_node("Identity", ["b"], ["yy"], name="/Identity")],
                                 "then", [], [body_y])
        other = helper.make_graph([helper.make_node("MatMul", ["b", "W"], ["m"], name=f"/{mod}/MatMul"),
                                   helper.make_node("Add", ["m", f"{mod}.bias"], ["yy"], name=f"/{mod}/Add")],
                                  "else", [], [body_y])
        nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul"),
                 helper.make_node("MatMul", ["a", "W"], ["b"], name="/fc_1/MatMul"),
                 helper.make_node("If", ["flag"], ["y"], name="/If", then_branch=then, else_branch=other)]
        save(helper.make_graph(nodes, "main_if", [x, flag0], [y],
                               [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b1, f"{mod}.bias")]),
             os.path.join(out, f"main_if_module{tail}.onnx"))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul"),
             helper.make_node("MatMul", ["a", "W"], ["b"], name="/fc_1/MatMul"),
             helper.make_node("MatMul", ["b", "W"], ["y"], name="/fc_1/MatMul_1")]
    save(helper.make_graph(nodes, "collide", [x], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "collide_nobias.onnx"))
    for n in nodes:
        n.name = n.name.replace("/fc", "/m/fc")
    save(helper.make_graph(nodes, "collide", [x], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "collide_nobias_prefixed.onnx"))
    then = helper.make_graph([helper.make_node("MatMul", ["b", "W"], ["yy"], name="/fc_1/MatMul")],
                             "then", [], [body_y])
    other = helper.make_graph([helper.make_node("Identity", ["b"], ["yy"], name="/Identity")],
                              "else", [], [body_y])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul"),
             helper.make_node("MatMul", ["a", "W"], ["b"], name="/fc_1/MatMul"),
             helper.make_node("If", ["flag"], ["y"], name="/If", then_branch=then, else_branch=other)]
    save(helper.make_graph(nodes, "main_if", [x, flag0], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "main_if_twins.onnx"))
    bodies = [helper.make_graph([helper.make_node("MatMul", ["a", "W"], ["yy"], name="/fc_1/MatMul")],
                                name, [], [body_y]) for name in ("then", "else")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="/fc/MatMul"),
             helper.make_node("If", ["flag"], ["y"], name="/If", then_branch=bodies[0], else_branch=bodies[1])]
    save(helper.make_graph(nodes, "main_if", [x, flag0], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "main_if_calls.onnx"))
    bodies = [helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["yy"], name="/fc/MatMul")],
                                name, [], [body_y]) for name in ("then", "else")]
    nodes = [helper.make_node("If", ["flag"], ["a"], name="/If", then_branch=bodies[0], else_branch=bodies[1]),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="/fc_1/MatMul")]
    save(helper.make_graph(nodes, "if_main", [x, flag0], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "if_then_main_call.onnx"))
    # the same scopes on an embedding table that onnxruntime's EmbedLayerNormalization reads
    # (a layer with no branch form): /emb/ and two nodes scoped /emb_1/, no bias
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, [2, 3])
    ye = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])
    eln = lambda o, n: helper.make_node("EmbedLayerNormalization", ["ids", "", "E", "P", "", "g", "b"],
                                        [o, o + "_mask"], name=n, domain="com.microsoft", epsilon=1e-5)
    nodes = [eln("e0", "/emb/EmbedLayerNormalization"), eln("e1", "/emb_1/EmbedLayerNormalization"),
             eln("e2", "/emb_1/EmbedLayerNormalization_1"),
             helper.make_node("Add", ["e0", "e1"], ["s"], name="/Add"),
             helper.make_node("Add", ["s", "e2"], ["y"], name="/Add_1")]
    inits = [numpy_helper.from_array(f32(10, 8), "E"), numpy_helper.from_array(f32(3, 8), "P"),
             numpy_helper.from_array(f32(8), "g"), numpy_helper.from_array(f32(8), "b")]
    save(helper.make_graph(nodes, "emb_collide", [ids], [ye], inits),
         os.path.join(out, "emb_collide_nobias.onnx"),
         extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


def call_order(out):
    """Calls listed out of their scopes' order, and scopes beside a module deeper down (see the
    docstring: union_scopes, later_call_first, ...)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    w, w1 = f32(8, 8), f32(8, 8)
    mm = lambda i, o, n, wn="W": helper.make_node("MatMul", [i, wn], [o], name=n)
    add = lambda a, b, o: helper.make_node("Add", [a, b], [o], name=f"/Add_{o}")
    # collide_nobias on a weight named fc.weight, beside a module blocks.0.fc_1 of its own
    nodes = [mm("x", "a", "/fc/MatMul", "fc.weight"), mm("a", "b", "/fc_1/MatMul", "fc.weight"),
             mm("b", "c", "/fc_1/MatMul_1", "fc.weight"),
             mm("c", "y", "/blocks.0/fc_1/MatMul", "blocks.0.fc_1.weight")]
    save(helper.make_graph(nodes, "union", [x], [y], [numpy_helper.from_array(w, "fc.weight"),
                                                      numpy_helper.from_array(w1, "blocks.0.fc_1.weight")]),
         os.path.join(out, "union_scopes.onnx"))
    # the same under a wrapper scope /m/ (no path is the adapter's exactly)
    for n in nodes:
        n.name = "/m" + n.name
        n.input[1] = "m." + n.input[1]
    save(helper.make_graph(nodes, "union", [x], [y], [numpy_helper.from_array(w, "m.fc.weight"),
                                                      numpy_helper.from_array(w1, "m.blocks.0.fc_1.weight")]),
         os.path.join(out, "union_scopes_wrapped.onnx"))
    # under /m/: a module fc_1 of its own, and blocks.0.fc called twice (its later call scoped
    # blocks.0.fc_1, reading blocks.0.fc's weight)
    nodes = [mm("x", "a", "/m/fc_1/MatMul", "m.fc_1.weight"),
             mm("a", "b", "/m/blocks.0/fc/MatMul", "m.blocks.0.fc.weight"),
             mm("b", "y", "/m/blocks.0/fc_1/MatMul", "m.blocks.0.fc.weight")]
    save(helper.make_graph(nodes, "deep", [x], [y], [numpy_helper.from_array(w, "m.fc_1.weight"),
                                                     numpy_helper.from_array(w1, "m.blocks.0.fc.weight")]),
         os.path.join(out, "deep_call_wrapped.onnx"))
    # a merged decoder that keeps a copy of the weight per body, fc called twice in each
    bodies = [helper.make_graph([mm("x", "a", "/fc/MatMul", f"{name}W"), mm("a", "t", "/fc_1/MatMul", f"{name}W")],
                                name, [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 8])],
                                [numpy_helper.from_array(w, f"{name}W")]) for name in ("then", "else")]
    nodes = [helper.make_node("If", ["flag"], ["y"], name="/If", then_branch=bodies[0], else_branch=bodies[1])]
    save(helper.make_graph(nodes, "g", [x, flag], [y], []), os.path.join(out, "if_copies_calls.onnx"))
    # fc's later call listed (and run) before fc: independent branches in another topological order
    nodes = [mm("x", "b", "/fc_1/MatMul"), mm("x", "a", "/fc/MatMul"), add("a", "b", "y")]
    save(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "later_call_first.onnx"))
    it = helper.make_tensor_value_info("it", TensorProto.INT64, [])
    cin = helper.make_tensor_value_info("cin", TensorProto.BOOL, [])
    cout = helper.make_tensor_value_info("cout", TensorProto.BOOL, [])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 8])
    vo = helper.make_tensor_value_info("vo", TensorProto.FLOAT, [2, 8])
    body = helper.make_graph([helper.make_node("Identity", ["cin"], ["cout"]), mm("v", "vo", "/fc_1/MatMul")],
                             "body", [it, cin, v], [cout, vo])
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["b"], name="/Loop", body=body),
             mm("x", "a", "/fc/MatMul"), add("a", "b", "y")]
    save(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "W"),
                                                  numpy_helper.from_array(np.array(2, np.int64), "trip")]),
         os.path.join(out, "later_call_in_loop_first.onnx"))
    nodes = [mm("x", "b", "/fc_1/MatMul"), mm("x", "c", "/fc_1/MatMul_1"), mm("x", "a", "/fc/MatMul"),
             add("a", "b", "s"), add("s", "c", "y")]
    save(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "collide_nobias_reordered.onnx"))
    # nested stacks: layers.0.fc1 beside encoder.layers.0.fc1, as they are and under a wrapper /m/
    for pre in ("", "m."):
        scope = "/" + pre.rstrip(".") if pre else ""
        nodes = [mm("x", "a", f"{scope}/layers.0/fc1/MatMul", f"{pre}layers.0.fc1.weight"),
                 mm("a", "y", f"{scope}/encoder/layers.0/fc1/MatMul", f"{pre}encoder.layers.0.fc1.weight")]
        save(helper.make_graph(nodes, "g", [x], [y],
                               [numpy_helper.from_array(w, f"{pre}layers.0.fc1.weight"),
                                numpy_helper.from_array(w1, f"{pre}encoder.layers.0.fc1.weight")]),
             os.path.join(out, f"nested_stacks{'_wrapped' if pre else ''}.onnx"))
    # fc called 40 times (an unrolled loop): /fc/MatMul, /fc_1/MatMul, ..., /fc_39/MatMul
    nodes = [mm("x" if i == 0 else f"h{i}", "y" if i == 39 else f"h{i + 1}",
                "/fc/MatMul" if i == 0 else f"/fc_{i}/MatMul") for i in range(40)]
    save(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "W")]),
         os.path.join(out, "many_calls.onnx"))
    # fc in both bodies of an If, the else body on an equal copy of its own; fc's later call after
    # the If on W; with either body's attribute first
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 8])
    then = helper.make_graph([mm("x", "t", "/fc/MatMul")], "then", [], [t])
    other = helper.make_graph([mm("x", "t", "/fc/MatMul", "We")], "else", [], [t],
                              [numpy_helper.from_array(w, "We")])
    for first in ("then", "else"):
        iff = helper.make_node("If", ["flag"], ["a"], name="/If", then_branch=then, else_branch=other)
        iff.attribute.sort(key=lambda a: a.name != f"{first}_branch")
        save(helper.make_graph([iff, mm("a", "y", "/fc_1/MatMul")], "g", [x, flag], [y],
                               [numpy_helper.from_array(w, "W")]),
             os.path.join(out, f"if_local_copy_{first}_first.onnx"))


if __name__ == "__main__":
    main(sys.argv[1])
