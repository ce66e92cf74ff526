"""`torchrun ... -m chatflow.train --file RUN.yaml --output DIR --cache-dir DIR`."""

import sys

from chatflow.train.loop import main

sys.exit(main())
