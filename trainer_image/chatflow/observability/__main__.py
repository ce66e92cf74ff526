import sys

from chatflow.observability.generate import main

sys.exit(main())
