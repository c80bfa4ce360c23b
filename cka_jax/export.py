"""`python -m cka_jax.export`: the command of `cka_jax.interop.export`, kept at its old name."""

import sys

from cka_jax.interop.export import main

if __name__ == "__main__":
    sys.exit(main())
