import sys

from lm.grow.run import main

sys.exit(main())
