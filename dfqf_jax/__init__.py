"""dfqf_jax: Data Free Quantization-aware Fine-tuning (DFQF, ACML 2020) in JAX/Flax."""
