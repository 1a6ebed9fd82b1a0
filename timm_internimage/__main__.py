"""``python -m timm_internimage``: see :mod:`timm_internimage.cli`."""
import sys

from .cli import main

sys.exit(main())
