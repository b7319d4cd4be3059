"""fedquant: quantized, private federated learning on Flower.

The library half of the project: quantizers, bit packing, the payload codec,
aggregation rules, data and models. Importable without Ray or a Flower server.
"""
