"""`python -m clipper VERB ...` is `clipper VERB ...` (under torchrun too: `torchrun ... -m clipper train ...`)."""

import sys

from .cli import main

sys.exit(main())
