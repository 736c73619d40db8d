import sys

from pfq.report.cli import main

sys.exit(main())
