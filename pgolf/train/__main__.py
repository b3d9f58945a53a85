import sys

from pgolf.train.cli import main

sys.exit(main())
