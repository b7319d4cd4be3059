"""Launchers: simulation (`flwr run` on Ray), gRPC deployment, TLS material, processes."""
