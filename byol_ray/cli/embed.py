"""``byol-ray embed``: a trained encoder's embeddings of a dataset split or an image folder, as Parquet.

    byol-ray embed --encoder outputs/ray_results/byol-fmnist --data experiments/fmnist.yaml --output emb.parquet
    byol-ray embed --encoder runs:/<run id>/encoder --data /images/val --output emb.parquet --concurrency 4

``--encoder`` is read as ``byol-ray eval`` reads it (a checkpoint folder, the run folder above them, or
an MLflow model URI). ``--data`` is a YAML config (its dataset's ``--split``, default test) or a folder
of images (labels when the images sit in class folders right below it). The Parquet file holds ``id``
(the image's index in the split, or its file path), ``label`` where there is one, and ``embedding``: the
evaluator's features (the evaluation transform with the pretraining data's normalisation, then the
encoder). It runs as Ray Data batch inference (``distributed/embed.py``) on a local Ray or, with
``--address``, on a cluster; every input is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import Config
from ..errors import UserError, run_cli
from ..eval.embedding import embed_source, input_stats
from ..eval.encoders import load_encoder, resolve_encoder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray embed", description=__doc__.split("\n")[0])
    p.add_argument("--encoder", required=True, help="checkpoint dir (or the ray_results/<run> folder), or MLflow URI")
    p.add_argument("--data", required=True, help="a YAML config (its dataset) or a folder of images")
    p.add_argument("--output", required=True, help="the Parquet file to write (must not exist)")
    p.add_argument("--split", default="test", help="with a config: the split to embed (train, test, unlabeled)")
    p.add_argument("--concurrency", type=int, default=1, help="encoder actors at once (each loads it once)")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch")
    p.add_argument("--address", default="", help="the Ray cluster (default: a local Ray)")
    p.add_argument("--tracking-uri", default="", help="MLflow store of a model URI (default: outputs/mlflow.db)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        t0 = time.time()
        output = Path(args.output).expanduser().resolve()
        if output.exists():
            raise UserError(
                f"--output {args.output} already exists and is not overwritten. Remove it, or name another file."
            )
        if args.concurrency < 1 or args.batch_size < 1:
            raise UserError(
                f"--concurrency and --batch-size must be >= 1, got {args.concurrency} and {args.batch_size}"
            )
        ref = resolve_encoder(args.encoder, args.tracking_uri)
        _, channels = load_encoder(ref)  # loadable here before any actor tries
        source = embed_source(args.data, args.split)
        cfg = Config.from_dict(ref.config)
        stats = input_stats(cfg)  # the evaluator's normalisation: the pretraining train split's
        print(f"[embed] encoder {ref.kind} {ref.location}; images at {cfg.data.image_size} px", flush=True)

        from ..distributed.embed import run_embed  # Ray only once every input is known to be good

        out = run_embed(
            ref, source, channels, cfg.data.image_size, stats, output, args.address, args.concurrency, args.batch_size
        )
        print(
            f"[embed] wrote {out['images']} embeddings of dimension {out['dim']} to {out['output']} "
            f"({time.time() - t0:.0f} s)",
            flush=True,
        )
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
