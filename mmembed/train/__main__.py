"""``python -m mmembed.train RECIPE.yaml key=value ...`` (also under ``deepspeed -m`` and ``torchrun``)."""

from __future__ import annotations

import sys

from mmembed.config import ConfigError, load_recipe
from mmembed.data.skips import DataError
from mmembed.train.loop import train
from mmembed.train.safe_load import CheckpointError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``RECIPE [key=value ...]``, validate, train. Config errors exit with code 2, no traceback."""
    import argparse

    parser = argparse.ArgumentParser(prog="mmembed train", description="Train a recipe.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        cfg.check_paths()  # before anything heavy is built
        if not cfg.data.train:
            raise ConfigError(
                "data.train", "no training data: set data.train (a manifest, directory or file)", cfg.source
            )

        result = train(cfg)
    except ConfigError as e:
        print(f"mmembed: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # data.strict: the first bad sample, with its file and row
        print(f"mmembed: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # corrupt, unsafe or unwritable checkpoint: names the file
        print(f"mmembed: checkpoint error: {e}", file=sys.stderr)
        return 2
    if result.final_dir is not None:
        print(f"trained {result.steps} steps; model saved to {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
