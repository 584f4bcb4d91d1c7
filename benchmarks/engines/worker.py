"""One engine of bench_engines.py in a long-lived process: `python worker.py ENGINE`, run by the
interpreter of the virtualenv that engine needs (torch engines: .venv; ort: .venv-ort;
deepsparse: .venv-deepsparse).

Protocol: one JSON object a line on stdin; each answer is one line "@@ {json}" on stdout (engines
print banners of their own; the driver reads only the "@@" lines).
  {"cmd": "load", "model": "bert"|"llama", "cfg": {...}, "input": x.npy, "weights": w.npz,
   "recipe": {...}|null, "save_weights": path|null, "threads": 2}
      -> {"ok": true, "load_s": s, "detail": str} | {"ok": false, "error": str}
     torch engines build the Hugging Face model from cfg (weights from w.npz, or seeded random
     ones when absent); pysparse sparsifies it with the recipe and may save the zeroed weights
     (the ones every other engine then runs) to save_weights. ort/deepsparse build the ONNX
     graph of engines/onnx_graphs.py from w.npz.
  {"cmd": "time", "reps": k}  -> {"times": [seconds, ...]}  (k calls on the loaded input)
  {"cmd": "output", "path": p} -> {"ok": true}  (the output as .npy, for the agreement check)
  {"cmd": "quit"}
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES = ("torch", "torch-compile", "pysparse", "pysparse-compile", "ort", "deepsparse")


def _hf_model(model, cfg):
    import transformers

    if model == "bert":
        m = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False)
    elif model == "llama":
        m = transformers.LlamaModel(transformers.LlamaConfig(**cfg))
    else:
        raise ValueError(f"unknown model {model!r}")
    return m.eval()


def _torch_engine(name, req):
    import copy

    import torch

    torch.set_num_threads(req["threads"])
    torch.manual_seed(0)
    m = _hf_model(req["model"], req["cfg"])
    if req.get("weights"):
        sd = {k: torch.from_numpy(v) for k, v in np.load(req["weights"]).items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if "embed" not in k and "position" not in k and "token_type" not in k]:
            raise ValueError(f"weights file does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    detail = ""
    if name.startswith("pysparse"):
        import pysparse

        tokens = int(np.prod(np.load(req["input"], mmap_mode="r").shape[:-1]))
        with torch.no_grad():
            report = pysparse.sparsify(m, req["recipe"], skip_ends=False, shapes=[tokens], progress=False)
        kernels = {}
        for r in report:
            if "kernel" in r:
                kernels[r["kernel"]] = kernels.get(r["kernel"], 0) + 1
        detail = "kernels " + ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items()))
    if req.get("save_weights"):  # the dense equivalent: every swapped layer back to nn.Linear
        dense = copy.deepcopy(m)
        for n, mod in list(dense.named_modules()):
            if hasattr(mod, "to_linear"):
                dense.set_submodule(n, mod.to_linear())
        np.savez(req["save_weights"], **{k: v.detach().float().numpy() for k, v in dense.state_dict().items()})
    body = m.encoder if req["model"] == "bert" else m
    x = torch.from_numpy(np.load(req["input"]))

    run = torch.compile(body) if name.endswith("-compile") else body

    def fn():
        with torch.inference_mode():
            if req["model"] == "bert":
                return run(x)[0]
            return run(inputs_embeds=x, use_cache=False)[0]

    return fn, (lambda: fn().float().numpy()), detail


def _onnx_model(req):
    sys.path.insert(0, HERE)
    from onnx_graphs import BUILDERS

    import onnx

    x = np.load(req["input"])
    w = dict(np.load(req["weights"]))
    model = BUILDERS[req["model"]](w, req["cfg"], x.shape)
    path = os.path.join(os.path.dirname(req["weights"]), f"{req['model']}_{os.getpid()}.onnx")
    onnx.save(model, path)
    return x, path, model.graph.input[0].name


def _ort_engine(req):
    import onnxruntime as ort

    x, path, in_name = _onnx_model(req)
    so = ort.SessionOptions()
    so.intra_op_num_threads = req["threads"]
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    fn = lambda: sess.run(None, {in_name: x})[0]  # noqa: E731
    return fn, fn, f"onnxruntime {ort.__version__}"


def _deepsparse_engine(req):
    import deepsparse

    x, path, _ = _onnx_model(req)
    engine = deepsparse.Engine(model=path, batch_size=x.shape[0], num_cores=req["threads"])
    fn = lambda: engine.run([x])[0]  # noqa: E731
    return fn, fn, f"deepsparse {deepsparse.__version__}"


def _load(name, req):
    if name == "ort":
        return _ort_engine(req)
    if name == "deepsparse":
        return _deepsparse_engine(req)
    return _torch_engine(name, req)


def main() -> None:
    name = sys.argv[1]
    if name not in ENGINES:
        raise SystemExit(f"worker: unknown engine {name!r}; one of {', '.join(ENGINES)}")
    out = sys.stdout
    sys.stdout = sys.stderr  # banners and warnings of the engines go to stderr

    def answer(obj):
        out.write("@@ " + json.dumps(obj) + "\n")
        out.flush()

    fn = output = None
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "load":
                t0 = time.perf_counter()
                fn, output, detail = _load(name, req)
                fn()  # first call: lazy initialisation, compilation
                answer({"ok": True, "load_s": time.perf_counter() - t0, "detail": detail})
            elif cmd == "time":
                times = []
                for _ in range(int(req["reps"])):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                answer({"times": times})
            elif cmd == "output":
                np.save(req["path"], np.asarray(output(), dtype=np.float32))
                answer({"ok": True})
            elif cmd == "quit":
                answer({"ok": True})
                return
            else:
                answer({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as e:  # reported to the driver, which skips the engine with this reason
            traceback.print_exc(file=sys.stderr)
            answer({"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


if __name__ == "__main__":
    main()
