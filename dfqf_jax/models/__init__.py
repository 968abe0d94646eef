"""Pure flax.linen models: CIFAR ResNets (optionally fake-quantized) and the DAFL generator."""
