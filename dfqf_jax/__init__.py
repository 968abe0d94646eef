"""dfqf_jax: Data Free Quantization-aware Fine-tuning (DFQF, ACML 2020) in JAX/Flax.

`dfqf_jax.load(workdir, name)` reads a model back from a workdir and `dfqf_jax.list_models
(workdir)` lists the names (dfqf_jax.readback); both import JAX on first use, so that
`import dfqf_jax` stays light.
"""
__all__ = ["list_models", "load"]


def __getattr__(name: str):
  if name in __all__:
    from dfqf_jax import readback
    return getattr(readback, name)
  raise AttributeError(f"module 'dfqf_jax' has no attribute {name!r}")
