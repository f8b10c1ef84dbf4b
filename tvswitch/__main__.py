import sys

from tvswitch.cli import main

sys.exit(main())
