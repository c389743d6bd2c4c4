import sys

from repux.cli import main

sys.exit(main())
