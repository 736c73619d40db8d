#!/usr/bin/env python
"""ProFound-Conv PyTorch checkpoints <-> pfq model directories. See docs/convert.md.

python tools/convert_weights.py SRC DEST_DIR [--overwrite] [--size S] [--in-chans N] [--num-classes C]
python tools/convert_weights.py --to-torch SRC_DIR DEST.safetensors [--overwrite] [--encoder-only]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pfq.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
