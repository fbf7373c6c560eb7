"""The one seed derivation: every seed the product draws from another is ``derive_seed(base, *labels)``.

Independent streams for independent purposes (batch order vs initialisation, the sampler of a
resumed study or of worker 3, a trial's bootstrap), all reproducible from the seeds in the study
file. A hash keeps nearby bases (seed 0, seed 1) from giving overlapping streams, which ``seed + 1``
arithmetic does (seed 0's batch order was seed 1's initialisation).
"""

from __future__ import annotations

import hashlib


def derive_seed(base: int, *labels: str | int, bits: int = 63) -> int:
    """A seed in [0, 2**bits) determined by ``base`` and the ``labels`` that name its purpose.

    SHA-256 of ``"label:...:base"``; 63 bits by default (a torch generator takes it), ``bits=32``
    for numpy's legacy ``RandomState`` (Optuna's samplers).
    """
    if not 1 <= bits <= 63:
        raise ValueError(f"bits = {bits}: give 1..63")
    text = ":".join([*(str(label) for label in labels), str(int(base))])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)
