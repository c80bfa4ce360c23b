"""`python -m cka_jax.port`: the command of `cka_jax.interop.port`, kept at its old name."""

import sys

from cka_jax.interop.port import main

if __name__ == "__main__":
    sys.exit(main())
