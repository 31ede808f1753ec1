"""Private memory each import adds to a fresh process (what every torchrun rank pays before
it holds any data; forked ranks share it).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/import_memory.py
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/import_memory.py --block transformers

Imports ``--modules`` in order after torch and prints the process's private memory
(``Private_Clean + Private_Dirty`` of ``/proc/self/smaps_rollup``, Linux) after each.
``--block NAME`` makes ``import NAME`` (and its submodules) fail, as if it were not
installed, to measure what a module that PyG imports only optionally costs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import sys


def private_mib() -> float:
    fields = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


class Blocked(importlib.abc.MetaPathFinder):
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def find_spec(self, name, path, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ImportError(f"{name} blocked by --block")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--modules", nargs="+", default=["torch._dynamo", "transformers", "torch_geometric", "scalable_rec.pipeline"]
    )
    p.add_argument("--block", nargs="*", default=[], help="modules whose import fails")
    args = p.parse_args()
    if args.block:
        sys.meta_path.insert(0, Blocked(args.block))
    print(f"{'(interpreter)':28s} {private_mib():7.0f} MiB")
    importlib.import_module("torch")
    print(f"{'torch':28s} {private_mib():7.0f} MiB")
    for name in args.modules:
        if name in args.block:
            continue
        importlib.import_module(name)
        print(f"{name:28s} {private_mib():7.0f} MiB")


if __name__ == "__main__":
    main()
