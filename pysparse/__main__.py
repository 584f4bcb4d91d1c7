"""python -m pysparse {info,demo}"""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pysparse", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="what was built and which kernels run here")
    d = sub.add_parser("demo", help="prune BERT-base and LLaMA-7B sized layers; ours vs dense vs torch.sparse")
    d.add_argument("--quick", action="store_true", help="BERT-base layers only")
    args = p.parse_args(argv)
    import pysparse

    if args.cmd == "info":
        print(json.dumps(pysparse.info(), indent=2))
    elif args.cmd == "demo":
        from ._demo import run

        run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
