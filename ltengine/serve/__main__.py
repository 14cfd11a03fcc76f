"""``python -m ltengine.serve [MODEL] [options]`` = ``ltengine serve``."""
import sys

from .cli import main

sys.exit(main())
