import sys

from pcfast.cli import main

sys.exit(main())
