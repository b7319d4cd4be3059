"""Seeds derived from the run seed, for the randomness that is public by design.

Both apps derive seeds here: the server for its client sampling, a client for its
model-independent draws (DPQuant's layer schedule, stochastic rounding of the upload).
All of these are public in the threat model (README "Privacy"): anyone who knows the
run seed can reproduce them. Nothing that protects a client's examples (DP noise,
Poisson batches, the DPQuant estimator's subsample and noise) may come from here, except
under the explicit, non-private ``dp-noise-seeded`` option.
"""

from __future__ import annotations

import hashlib

__all__ = ["node_seed"]


def node_seed(*parts: int) -> int:
    """A 63-bit seed from (run seed, round, partition, ...), never from the clock.

    ``int.from_bytes(SHA-256(":".join(parts))[:8], "little") >> 1``: distinct tuples give
    independent-looking seeds, the same tuple the same seed on every machine and in every
    process (Python's ``hash`` is salted per process, so it would not do).
    """
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
