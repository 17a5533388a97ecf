"""``python -m scaleclr.data.shards write IMAGEFOLDER_OR_FILELIST OUT_DIR [--shard-size 1GiB] [--max-side N]
[--workers K]``: write WebDataset shards and their index (:mod:`scaleclr.data.shards.writer`);
``python -m scaleclr.data.shards index SPEC``: build (or check) the index of existing shards."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaleclr.data.shards", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="ImageFolder or file list -> WebDataset shards + index")
    w.add_argument("src", metavar="IMAGEFOLDER_OR_FILELIST")
    w.add_argument("out", metavar="OUT_DIR")
    w.add_argument("--shard-size", default="1GiB", help="bytes per shard at most (default 1GiB)")
    w.add_argument("--max-side", type=int, default=None,
                   help="resize images whose longer side exceeds N to N (re-encoded); default: store as they are")
    w.add_argument("--workers", type=int, default=1, help="processes encoding images (default 1)")
    w.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("index", help="build the index of existing shards (a folder or brace notation)")
    i.add_argument("spec")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        if args.command == "write":
            from scaleclr.data.shards.writer import parse_size, write_shards
            if args.max_side is not None and args.max_side < 8:
                raise ValueError(f"--max-side {args.max_side} must be >= 8 pixels")
            if args.workers < 1:
                raise ValueError(f"--workers {args.workers} must be >= 1")
            shards = write_shards(args.src, args.out, parse_size(args.shard_size), args.max_side, args.workers,
                                  progress=not args.no_progress)
            print(f"wrote {len(shards)} shard(s) to {args.out}")
        else:
            from scaleclr.data.shards.source import ShardSource
            src = ShardSource(args.spec, key="SPEC")
            print(f"{len(src)} samples in {len(src.shards)} shard(s)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
