"""Pallas attention kernels for jaxvllm, each with a pure-jnp reference beside it."""
