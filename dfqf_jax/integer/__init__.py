"""Integer deployment of a fake-quantized CIFAR ResNet: export format and integer forward.

One module per concern:
  graph        fake-quantized variables -> the integer graph and its arrays (weight codes,
               folded batch norm, activation steps, rescaling constants) (`build`);
  requant      the rescaling between layers, exact in int32 where the inputs are codes;
  forward      the integer forward pass of a graph (`forward`, `IntegerResNet`);
  format       the export folder's files, packing, `save` and the checked `load`;
  artifact     the forward pass as a `jax.export` program (`serialize`, model.stablehlo);
  diagnostics  the integer layers against the fake-quantized model's own tensors.
Everything public is importable from `dfqf_jax.integer` itself.
"""
from dfqf_jax.integer.artifact import (deserialize, exported_function, serialize,
                                       unpack_in_graph)
from dfqf_jax.integer.diagnostics import (compare_layers, fake_quant_tensors, layer_by_layer,
                                          output_unit)
from dfqf_jax.integer.format import (FORMAT, GRAPH_FILE, PACK_BITS, STABLEHLO_FILE, VERSION,
                                     WEIGHTS_FILE, load, pack, save, stored_arrays, unpack)
from dfqf_jax.integer.forward import (DIMS, IntegerResNet, apply_layer, forward,
                                      integer_conv, option_a_shortcut)
from dfqf_jax.integer.graph import (BN_EPSILON, POOL_POSITIONS, act_step, build,
                                    check_exportable, fold_bn, num_params, weight_codes)
from dfqf_jax.integer.requant import (FRACTION_ONE, LIMB, TABLES, exact_layers,
                                      exact_requantize, requant_params, requant_tables)
