"""Registration benchmarks: synthetic X-ray/CT cases with known ground-truth poses, stored as HDF5.

The file layout is documented in ``docs/benchmark-format.md``.
"""

from .synthetic import (
    DEFAULT_LEVELS,
    FORMAT_NAME,
    FORMAT_VERSION,
    BenchmarkCase,
    SyntheticBenchmark,
    anatomy_center,
    make_synthetic_benchmark,
    mobile_carm_intrinsics,
    read_label_names,
    read_synthetic_benchmark,
)

__all__ = [
    "DEFAULT_LEVELS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BenchmarkCase",
    "SyntheticBenchmark",
    "anatomy_center",
    "make_synthetic_benchmark",
    "mobile_carm_intrinsics",
    "read_label_names",
    "read_synthetic_benchmark",
]
