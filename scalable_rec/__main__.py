import sys

from scalable_rec.cli import main

sys.exit(main())
