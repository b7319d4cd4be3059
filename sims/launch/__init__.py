"""Launchers: Flower simulation (Ray), gRPC deployment, and the in-process grid."""
