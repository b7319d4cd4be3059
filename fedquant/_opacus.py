"""Import Opacus once, without the root log handler it installs.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` at import, which would print
every Flower log line twice. Modules that use Opacus import this module first.
"""

import logging


def _import_opacus_quietly() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


_import_opacus_quietly()
