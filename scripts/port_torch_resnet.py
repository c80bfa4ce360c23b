"""Port a torchvision ResNet checkpoint into a cka_jax model checkpoint (a teacher).

A thin wrapper kept for existing commands: the command line is `cka_jax.interop.port.main`, so this
is the same as ``python -m cka_jax.port ...`` (flags: ``--help``; docs/porting.md).
"""

import sys

from cka_jax.interop.port import main

if __name__ == "__main__":
    sys.exit(main())
