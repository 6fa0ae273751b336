"""``python -m samv2view ...`` is ``samv2 view ...``."""
import sys

from .cli import main

sys.exit(main())
