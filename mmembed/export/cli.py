"""``mmembed export MODEL_DIR OUT --to hf|sentence-transformers [--overwrite]`` (docs/export.md).

:func:`main` is the whole command (``tools/export_model.py``); :func:`add_arguments` and :func:`run` let the
``mmembed`` CLI mount it as a subcommand with the same options.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser", "add_arguments", "run", "DESCRIPTION"]

DESCRIPTION = (
    "export a model directory for transformers / vLLM (--to hf: native VLM backbones) or sentence-transformers "
    "(--to sentence-transformers: any model)"
)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's arguments on ``p`` (a parser or a subcommand's parser)."""
    p.add_argument("model_dir", metavar="MODEL_DIR", help="an mmembed model directory (mmembed_config.json)")
    p.add_argument("out", metavar="OUT", help="the export folder")
    p.add_argument("--to", choices=("hf", "sentence-transformers"), default="hf", help="target (default: hf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return p


def build_parser(prog: str = "mmembed export") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    """Run the export of parsed ``args``; 0 on success, 2 with the reason on stderr when refused or invalid."""
    from mmembed.export import ExportError, export_model
    from mmembed.io import ModelDirError

    try:
        out = export_model(args.model_dir, args.out, to=args.to, overwrite=args.overwrite)
    except (ExportError, ModelDirError, FileNotFoundError) as e:
        print(f"mmembed export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.model_dir} -> {out} ({args.to})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``mmembed export`` on ``argv`` (default ``sys.argv[1:]``)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
