import sys

from interp_edit.cli import main

sys.exit(main())
