"""`python -m lora_core` runs the demo (see `lora_core.demo`)."""

import sys

from .demo import main

sys.exit(main())
