"""`python -m sparecycles ...` is `sparecycles ...`."""

import sys

from sparecycles.cli.main import main

sys.exit(main())
