"""`python -m cka_jax.report`: the command of `cka_jax.stages.report`, kept at its old name."""

from cka_jax.stages.report import main

if __name__ == "__main__":
    main()
