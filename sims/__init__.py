"""Everything that runs fedquant: the ServerApp, the launchers, the benchmarks.

``sims.app``: the ServerApp (round loop, checkpoints, report). ``sims.launch``: local
simulation on Ray, gRPC deployment, certificates, the in-process grid. ``sims.bench``:
benchmark scripts and their sweep framework.
"""
