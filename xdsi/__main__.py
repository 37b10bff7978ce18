import sys

from xdsi.cli import main

sys.exit(main())
