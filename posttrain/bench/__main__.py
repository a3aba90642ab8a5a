"""``python -m posttrain.bench NAME [options]``: benchmarks that print numbers (never timed tests).

Each NAME is a module ``posttrain.bench.NAME`` with ``main(argv) -> int``.
"""

import importlib
import pkgutil
import sys

import posttrain.bench as package


def main() -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(f"usage: python -m posttrain.bench {{{','.join(names)}}} [options]")
        return 0 if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else 2
    return int(importlib.import_module(f"posttrain.bench.{sys.argv[1]}").main(sys.argv[2:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
