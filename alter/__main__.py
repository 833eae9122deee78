import sys

from alter.cli import main

sys.exit(main())
