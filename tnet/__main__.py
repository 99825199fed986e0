"""``python3 -m tnet`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
