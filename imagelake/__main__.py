import sys

from imagelake.cli import main

sys.exit(main())
