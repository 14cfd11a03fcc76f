"""``python -m ltengine ...``: the ``ltengine`` command."""
import sys

from .cli import main

sys.exit(main())
