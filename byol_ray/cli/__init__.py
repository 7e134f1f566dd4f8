"""`byol-ray <command>`: the console entry point.

    byol-ray train --config experiments/fmnist.yaml optim.epochs=5
    byol-ray sweep tau            # a Ray Tune ablation sweep (experiments/sweeps/tau.yaml)
    byol-ray report tau           # the sweep's ablation table, next to the paper's numbers
    byol-ray eval linear|semi|transfer --encoder <checkpoint dir or MLflow model URI>
    byol-ray embed --encoder <checkpoint dir or MLflow model URI> --data <config or folder> --output e.parquet
    byol-ray bench                # throughput figures
    byol-ray mlflow-server        # a local MLflow tracking server (127.0.0.1)

Each command lives in its own module with a `main(argv) -> int`; they are imported lazily so that
`byol-ray --help` does not pay for importing Ray, torch and MLflow.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("byol_ray.cli.train", "BYOL pretraining on Ray Train"),
    "sweep": ("byol_ray.cli.sweep", "a Ray Tune ablation sweep, one Ray Train run per trial"),
    "report": ("byol_ray.cli.report", "a sweep's ablation table and plot from MLflow"),
    "eval": ("byol_ray.cli.eval", "linear / semi-supervised / transfer evaluation of an encoder"),
    "embed": ("byol_ray.cli.embed", "an encoder's embeddings of a dataset or folder, to Parquet (Ray Data)"),
    "bench": ("byol_ray.cli.bench", "throughput benchmark"),
    "mlflow-server": ("byol_ray.cli.mlflow_server", "start a local MLflow tracking server"),
}


def usage() -> str:
    lines = ["usage: byol-ray {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<14}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "each command takes --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(
            f"byol-ray: error: unknown command {argv[0]!r}. Use one of: {', '.join(COMMANDS)} "
            f"(byol-ray --help describes them).",
            file=sys.stderr,
        )
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
