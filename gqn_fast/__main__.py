import sys

from gqn_fast.cli import main

sys.exit(main())
