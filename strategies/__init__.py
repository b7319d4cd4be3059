"""Flower server strategies that consume quantized replies."""
