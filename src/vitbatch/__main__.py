import sys

from vitbatch.cli import main

sys.exit(main())
