"""WKV-7 recurrence: the `lax.scan` oracle, the chunked XLA form and the Pallas TPU/GPU kernels.

The package itself is callable: `pallas_kernels.wkv7(r, w, k, v, a, b, state, backend=...)` is
`pallas_kernels.wkv7.ops.wkv7`, while `pallas_kernels.wkv7.reference` etc. stay importable.
"""

import sys
import types

from pallas_kernels.wkv7.ops import wkv7
from pallas_kernels.wkv7.reference import wkv7_reference
from pallas_kernels.wkv7.xla_chunked import wkv7_chunked

__all__ = ["wkv7", "wkv7_chunked", "wkv7_reference"]


class _CallableModule(types.ModuleType):
    """Lets `pallas_kernels.wkv7(...)` call the entry point without hiding the submodules."""

    def __call__(self, *args, **kwargs):
        return wkv7(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
