"""`python -m diffsynth.training ...` / `accelerate launch -m diffsynth.training ...`."""
import sys

from .trainer import main

sys.exit(main())
