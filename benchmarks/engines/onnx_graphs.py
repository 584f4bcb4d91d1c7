"""ONNX graphs of the two benchmark models, built from a weights file with onnx.helper: a BERT
encoder (Hugging Face BertEncoder: post-LN, erf GELU, 12 heads) and a LLaMA-style decoder stack
(LlamaModel's layers + final norm: RMSNorm, SwiGLU) for one token.

Why build the graph rather than torch.onnx.export: the peer engines run in their own virtualenvs
(DeepSparse 1.8 needs onnx 1.14 and numpy < 2), and the graph is then the same one for both, in
the op vocabulary both engines optimise (opset 13; LayerNorm and GELU written out as the
classic exporter wrote them, which ONNX Runtime fuses and DeepSparse recognises).

Needs numpy and onnx only. Weights come from an .npz with Hugging Face state-dict names
(Linear weights in (out, in) layout); shapes are static (DeepSparse compiles for one shape).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


class _Graph:
    def __init__(self, weights):
        self.w = weights
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, array, hint="c"):
        nm = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), nm))
        return nm

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def linear(self, x, prefix, bias=True):
        # y = x W^T + b, W stored transposed once here as (in, out) for MatMul.
        w = self.const(np.ascontiguousarray(self.w[prefix + ".weight"].T.astype(np.float32)), prefix)
        y = self.op("MatMul", [x, w])
        if bias and prefix + ".bias" in self.w:
            y = self.op("Add", [y, self.const(self.w[prefix + ".bias"].astype(np.float32))])
        return y

    def layer_norm(self, x, prefix, eps):
        mean = self.op("ReduceMean", [x], axes=[-1])
        d = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [d, d])], axes=[-1])
        den = self.op("Sqrt", [self.op("Add", [var, self.const(np.float32(eps))])])
        y = self.op("Div", [d, den])
        y = self.op("Mul", [y, self.const(self.w[prefix + ".weight"].astype(np.float32))])
        return self.op("Add", [y, self.const(self.w[prefix + ".bias"].astype(np.float32))])

    def rms_norm(self, x, prefix, eps):
        var = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1])
        den = self.op("Sqrt", [self.op("Add", [var, self.const(np.float32(eps))])])
        y = self.op("Div", [x, den])
        return self.op("Mul", [y, self.const(self.w[prefix + ".weight"].astype(np.float32))])

    def gelu_erf(self, x):
        e = self.op("Erf", [self.op("Div", [x, self.const(np.float32(np.sqrt(2.0)))])])
        y = self.op("Mul", [x, self.op("Add", [e, self.const(np.float32(1.0))])])
        return self.op("Mul", [y, self.const(np.float32(0.5))])

    def self_attention(self, x, names, heads, hidden, bias):
        """Multi-head self-attention of x with the q, k, v projections `names`; no mask."""
        q, k, v = (self.linear(x, n, bias=bias) for n in names)
        return self.attention(q, k, v, heads, hidden // heads, hidden)

    def attention(self, q, k, v, heads, head_dim, hidden):
        # (B, L, hidden) -> (B, heads, L, head_dim); scores (B, heads, L, L); softmax; back.
        split = self.const(np.array([0, 0, heads, head_dim], np.int64))
        q = self.op("Transpose", [self.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
        k = self.op("Transpose", [self.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
        v = self.op("Transpose", [self.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
        s = self.op("Div", [self.op("MatMul", [q, k]), self.const(np.float32(np.sqrt(head_dim)))])
        p = self.op("Softmax", [s], axis=-1)
        ctx = self.op("Transpose", [self.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
        return self.op("Reshape", [ctx, self.const(np.array([0, 0, hidden], np.int64))])

    def model(self, x_name, y_name, out, shape):
        self.nodes.append(helper.make_node("Identity", [out], [y_name]))
        g = helper.make_graph(self.nodes, "pysparse_bench",
                              [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, list(shape))],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pysparse")
        m.ir_version = 8  # readable by onnx 1.14 / DeepSparse 1.8 and by current ONNX Runtime
        onnx.checker.check_model(m)
        return m


def bert_encoder(weights, cfg, shape):
    """BertModel.encoder for hidden states of `shape` (B, L, hidden); no attention mask."""
    g = _Graph(weights)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-12)
    x = "hidden_states"
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        ctx = g.self_attention(x, [p + f"attention.self.{n}" for n in ("query", "key", "value")], heads, hidden, True)
        a = g.op("Add", [g.linear(ctx, p + "attention.output.dense"), x])
        a = g.layer_norm(a, p + "attention.output.LayerNorm", eps)
        h = g.gelu_erf(g.linear(a, p + "intermediate.dense"))
        x = g.layer_norm(g.op("Add", [g.linear(h, p + "output.dense"), a]), p + "output.LayerNorm", eps)
    return g.model("hidden_states", "last_hidden_state", x, shape)


def llama_decoder(weights, cfg, shape):
    """LlamaModel (inputs_embeds of `shape` (B, 1, hidden), position 0) without the embedding:
    rotary embedding at position 0 is the identity, so it is left out; one token needs no mask."""
    if shape[1] != 1:
        raise ValueError(f"llama_decoder: one token (decode) only, got sequence length {shape[1]}")
    g = _Graph(weights)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    x = "inputs_embeds"
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        h = g.rms_norm(x, p + "input_layernorm", eps)
        ctx = g.self_attention(h, [p + f"self_attn.{n}_proj" for n in "qkv"], heads, hidden, False)
        x = g.op("Add", [x, g.linear(ctx, p + "self_attn.o_proj", bias=False)])
        h = g.rms_norm(x, p + "post_attention_layernorm", eps)
        gate = g.linear(h, p + "mlp.gate_proj", bias=False)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        up = g.op("Mul", [silu, g.linear(h, p + "mlp.up_proj", bias=False)])
        x = g.op("Add", [x, g.linear(up, p + "mlp.down_proj", bias=False)])
    x = g.rms_norm(x, "norm", eps)
    return g.model("inputs_embeds", "last_hidden_state", x, shape)


BUILDERS = {"bert": bert_encoder, "llama": llama_decoder}
