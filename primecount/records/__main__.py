"""C{python -m primecount.records}: the records tool (L{primecount.tools.records}), kept apart from the format."""

import sys

from primecount.tools.records import main

sys.exit(main())
