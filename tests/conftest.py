"""Test setup: 8 host CPU devices for sharding tests, set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The official runtimes read these at import time: pure-PyTorch CPU paths, RWKV-7 enabled.
os.environ["RWKV_CUDA_ON"] = "0"
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_V7_ON"] = "1"
