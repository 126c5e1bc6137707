"""`python -m opo ...`, and the entry point torchrun runs on every rank:

    torchrun --standalone --nproc_per_node N -m opo train [CONFIG] [key=value ...]
"""

import sys

from opo.cli import main

if __name__ == "__main__":
    sys.exit(main())
