import sys

from moegpt.cli import main

sys.exit(main())
