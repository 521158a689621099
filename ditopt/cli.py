"""The `ditopt` command line: `ditopt inspect FAMILY`, `ditopt bench ...`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def _inspect(args) -> int:
    import torch

    from . import models
    from .analysis import UnsupportedGraph, analyze

    case = models.build(args.family, args.size)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.call(torch.compile(case.model, backend=capture), case.inputs())
    print(f"{args.family} ({type(case.model).__name__}, size {args.size}): {len(graphs)} graph(s) from Dynamo")
    for i, gm in enumerate(graphs):
        try:
            structure = analyze(gm)
        except UnsupportedGraph as why:
            print(f"graph {i}: not analysed: {why}")
            continue
        print(f"graph {i}:")
        print(json.dumps(structure.to_json(), indent=2) if args.json else structure.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models import FAMILIES, SIZES

    parser = argparse.ArgumentParser(prog="ditopt", description="ditopt: a torch.compile backend for video DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the structure ditopt finds in a model of the zoo")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--json", action="store_true", help="print the full structure as JSON")
    p.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
