"""fedquant: quantized, private federated learning on Flower.

The library half of the project: the upload codec (quantizer, bit packing, payload),
aggregation rules, private local training with DPQuant, privacy accounting, data and
models. Importable without Ray or a Flower server; importing it loads nothing heavy.
"""
