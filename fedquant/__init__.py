"""fedquant: quantized, private federated learning on Flower.

The library half of the project: quantizers, bit packing, the payload codec,
aggregation rules, data and models. Importable without Ray or a Flower server.
"""

import logging as _logging


def _import_opacus_quietly() -> None:
    """Import Opacus without the root log handler it installs (``logging.basicConfig``
    in ``opacus.utils.module_utils``), which would print every Flower line twice."""
    root = _logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


_import_opacus_quietly()
