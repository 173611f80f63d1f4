import sys

from pgpilot.cli import main

sys.exit(main())
