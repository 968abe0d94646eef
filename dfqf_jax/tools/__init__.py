"""Analysis tools for exported integer models, run from the checkout's root:

  python -m dfqf_jax.tools.integer_check   the integer model against the fake-quantized one
                                           on the whole test split (class agreement, top-1,
                                           logit differences in output steps, sizes)
  python -m dfqf_jax.tools.rescale_ties    which side a disagreement is on: the fake-quant
                                           model in float64 against float32 and the integers
  python dfqf_jax/tools/run_exported.py    a `model.stablehlo` artifact run with JAX and NumPy
                                           alone (as a file: it must not import dfqf_jax)

Each writes a JSON record with --out; experiments/integer_check/ holds the ones behind
docs/integer.md.
"""
