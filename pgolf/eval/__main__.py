import sys

from pgolf.eval.cli import main

sys.exit(main())
