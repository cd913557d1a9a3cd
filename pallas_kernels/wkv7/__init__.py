"""WKV-7 recurrence: the `lax.scan` oracle and the chunked matmul form used on CPU."""

from pallas_kernels.wkv7.reference import wkv7_reference
from pallas_kernels.wkv7.xla_chunked import wkv7_chunked

__all__ = ["wkv7_chunked", "wkv7_reference"]
