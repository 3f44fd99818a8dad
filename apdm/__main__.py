import sys

from apdm.cli import main

sys.exit(main())
