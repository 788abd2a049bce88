import sys

from lightning_fl.cli import main

sys.exit(main())
