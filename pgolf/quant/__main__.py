import sys

from pgolf.quant.cli import main

sys.exit(main())
