"""Export an mmembed model directory to transformers / sentence-transformers: ``mmembed export`` as a script.

    python tools/export_model.py MODEL_DIR OUT --to hf|sentence-transformers [--overwrite]

(DeepSpeed checkpoints -> mmembed directories is tools/export_checkpoint.py; this one starts from such a directory.)
"""

from __future__ import annotations

import sys

from mmembed.export.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
