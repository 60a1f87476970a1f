"""``python -m bna_gateway`` is the ``bna`` command line."""
import sys

from bna_gateway.mitigation.cli import main

sys.exit(main())
