"""`byol-ray <command>`: the console entry point.

    byol-ray train --config experiments/fmnist.yaml optim.epochs=5
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "byol_ray.train"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: byol-ray {" + ",".join(commands) + "} [options]\n\n"
              "  train   BYOL pretraining on Ray Train (see: byol-ray train --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
