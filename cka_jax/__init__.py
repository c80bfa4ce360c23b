"""cka-jax: Contrastive Knowledge Amalgamation and its baselines in JAX/Flax.

The flow: config -> data -> tasks -> teachers -> amalgamation -> evaluation -> report.
"""

__version__ = "0.1.0"
