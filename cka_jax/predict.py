"""`python -m cka_jax.predict`: the command of `cka_jax.interop.predict`, kept at its old name."""

from absl import app

from cka_jax.interop.predict import main

if __name__ == "__main__":
    app.run(main)
