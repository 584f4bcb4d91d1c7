"""python -m pysparse {info,roofline,demo,layers,sparsify}"""
import argparse
import importlib
import json
import sys
from pathlib import Path


def _build_model(spec: str, weights):
    """'package.module:factory' -> the nn.Module the factory returns (the first element when it
    returns a tuple, e.g. (model, tokenizer)), with a safetensors state dict loaded into it."""
    import torch

    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise SystemExit(f"pysparse sparsify: MODEL must be 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"pysparse sparsify: cannot import {spec!r}: {e}") from None
    model = factory()
    if isinstance(model, tuple):
        model = model[0]
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"pysparse sparsify: {spec} returned {type(model).__name__}, not an nn.Module")
    if weights:
        from ._safetensors import load_file

        model.load_state_dict(load_file(weights)[0])
    return model.eval()


def _calibration(path):
    """A torch.load(weights_only=True) file: one batch (a tensor, a tuple of tensors: positional
    arguments, a dict of tensors: keyword arguments) or a list of batches; sparsify runs each
    (and refuses a list that looks like one batch's ids and mask)."""
    import torch

    data = torch.load(path, weights_only=True)
    batches = data if isinstance(data, list) else [data]
    for b in batches:
        parts = list(b.values()) if isinstance(b, dict) else list(b) if isinstance(b, tuple) else [b]
        if not all(isinstance(a, torch.Tensor) for a in parts):
            raise SystemExit(f"pysparse sparsify: {path} must hold a tensor, a tuple or dict of tensors, or a list "
                             f"of those")
    return data


def _check_writable(path: str, flag: str) -> None:
    """Fail before minutes of pruning, not after: the file can be created (or appended to)."""
    p = Path(path)
    if p.is_dir():
        raise SystemExit(f"pysparse sparsify: {flag} {path} is a folder, not a file")
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as e:
        raise SystemExit(f"pysparse sparsify: cannot write {flag} {path}: {e.strerror}") from None
    if not existed:
        p.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pysparse", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="what was built and which kernels run here")
    rf = sub.add_parser("roofline", help="this machine's ceilings: FMA peak (fp32, bf16) and read bandwidth per cache level")
    rf.add_argument("--threads", type=int, default=0, help="threads to measure on (default: torch's thread count)")
    rf.add_argument("--seconds", type=float, default=0.3, help="seconds per probe (the best of 3 is kept)")
    d = sub.add_parser("demo", help="prune all-MiniLM-L6-v2 with several recipes: size, latency, fidelity")
    d.add_argument("--quick", action="store_true", help="4 recipes (one recovered for 10 s), 200 evaluation sentences (a smoke run)")
    d.add_argument("--plot", default="minilm_demo.png", help="speed-vs-fidelity plot (PNG) path; '' for none")
    d.add_argument("--json", default="", help="also write the numbers to this JSON file")
    d.add_argument("--sensitivity", default="minilm_sensitivity.png",
                   help="per-layer sensitivity plot (PNG) path; '' to skip the analysis")
    ly = sub.add_parser("layers", help="BERT-base and LLaMA-7B sized layers at 90%%: pysparse vs dense vs torch.sparse")
    ly.add_argument("--quick", action="store_true", help="BERT-base layers only")
    s = sub.add_parser("sparsify", help="prune your model with a recipe and save it (safetensors)",
                       description="Prune a model with a recipe (see pysparse.sparsify), swap in the fastest kernels "
                                   "for this machine, print the report and save the result with save_sparse. Load it "
                                   "back with pysparse.nn.load_sparse(factory(), OUT).")
    s.add_argument("model", help="'package.module:factory': a callable that builds your (dense) model")
    s.add_argument("--weights", help="safetensors state dict to load into the built model")
    s.add_argument("--recipe", required=True, help="a .json or .yaml file, or JSON text: {pattern: rule or null}")
    s.add_argument("--calibration", help="torch.save'd inputs: one batch (a tensor, a tuple of tensors: positional "
                   "arguments, a dict of tensors: keyword arguments) or a list of batches")
    s.add_argument("--shapes", help="token counts to tune the kernels for, e.g. 1,256 (default: the calibration shape)")
    s.add_argument("--keep-ends", action="store_true", help="also prune the first and last linear layers")
    s.add_argument("--ignore", action="append", default=None, metavar="PATTERN",
                   help="leave modules matching PATTERN alone whatever rule matches them (glob, 're:<regex>' or "
                        "'type:<Class>'; repeatable)")
    s.add_argument("--no-cache", action="store_true", help="time the kernels again instead of using the on-disk choices")
    s.add_argument("--keep-activations", action="store_true",
                   help="keep the model's tanh-form GELU modules (default: pysparse's FastGELUTanh, the same function)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--report", help="also write the report as JSON here: {changes, skipped, totals}")
    args = p.parse_args(argv)
    from ._info import info
    from .nn import save_sparse, sparsify

    if args.cmd == "info":
        print(json.dumps(info(), indent=2))
    elif args.cmd == "roofline":
        from .bench import roofline

        try:
            r = roofline(args.threads or None, args.seconds)
        except ValueError as e:
            raise SystemExit(f"pysparse roofline: {e}") from None
        print(json.dumps(r.as_dict(), indent=2))
    elif args.cmd == "demo":
        from ._demo import run

        run(quick=args.quick, plot=args.plot or None, out_json=args.json or None,
            sensitivity_plot=args.sensitivity or None)
    elif args.cmd == "layers":
        from ._layers import run

        run(quick=args.quick)
    elif args.cmd == "sparsify":
        _check_writable(args.out, "--out")
        if args.report:
            _check_writable(args.report, "--report")
        if Path(args.recipe).is_file():
            recipe = args.recipe  # a .json / .yaml file: sparsify reads it (and names it in any error)
        else:
            try:
                recipe = json.loads(args.recipe)
            except ValueError as e:
                raise SystemExit(f"pysparse sparsify: --recipe is neither a JSON / YAML file nor JSON text ({e})") from None
        model = _build_model(args.model, args.weights)
        calib = _calibration(args.calibration) if args.calibration else None
        shapes = [int(t) for t in args.shapes.split(",")] if args.shapes else None
        try:
            report = sparsify(model, recipe, calib, skip_ends=not args.keep_ends, shapes=shapes, ignore=args.ignore,
                                       cache=not args.no_cache, fast_activations=not args.keep_activations)
        except ValueError as e:
            raise SystemExit(f"pysparse sparsify: {e}") from None
        print(report.table())
        save_sparse(model, args.out)
        if args.report:
            Path(args.report).write_text(report.to_json(indent=1))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
