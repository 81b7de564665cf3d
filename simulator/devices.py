"""Named device presets, with the source of every figure.

Peak rates are dense (no sparsity) for the dtype GR serving uses (BF16/FP16). Host link
is one direction of the host-device link. Launch overhead is not a datasheet figure: it
is a typical eager-mode kernel launch cost and should be replaced by a calibrated value.
"""

from __future__ import annotations

GiB = 1024**3
GB = 10**9

PRESETS: dict[str, dict] = {
    "h100": {
        "name": "NVIDIA H100 SXM5 80GB",
        "hbm_bytes": 80 * GB,
        "peak_tflops": 989.0,
        "hbm_gbps": 3350.0,
        "host_link_gbps": 64.0,
        "launch_overhead_us": 5.0,
        "host_dram_bytes": 2048 * GiB,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, "
                  "BF16 989 TFLOP/s dense (1,979 with sparsity); PCIe Gen5 x16 = 64 GB/s "
                  "per direction. Launch overhead: typical eager CUDA launch, assumed.",
    },
    "h200": {
        "name": "NVIDIA H200 SXM 141GB",
        "hbm_bytes": 141 * GB,
        "peak_tflops": 989.0,
        "hbm_gbps": 4800.0,
        "host_link_gbps": 64.0,
        "launch_overhead_us": 5.0,
        "host_dram_bytes": 2048 * GiB,
        "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, "
                  "BF16 989 TFLOP/s dense; PCIe Gen5 x16 = 64 GB/s per direction. "
                  "Launch overhead assumed as for H100.",
    },
    "a100": {
        "name": "NVIDIA A100 SXM4 80GB",
        "hbm_bytes": 80 * GB,
        "peak_tflops": 312.0,
        "hbm_gbps": 2039.0,
        "host_link_gbps": 32.0,
        "launch_overhead_us": 5.0,
        "host_dram_bytes": 1024 * GiB,
        "source": "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): HBM2e 2,039 GB/s, "
                  "BF16 312 TFLOP/s dense; PCIe Gen4 x16 = 32 GB/s per direction.",
    },
    "ascend910b": {
        "name": "Huawei Ascend 910B",
        "hbm_bytes": 64 * GB,
        "peak_tflops": 320.0,
        "hbm_gbps": 1600.0,
        "host_link_gbps": 32.0,
        "launch_overhead_us": 10.0,
        "host_dram_bytes": 1536 * GiB,
        "source": "No public Huawei datasheet; third-party reports: FP16 ~320 TFLOP/s, "
                  "64 GB HBM2e at ~1.6 TB/s, PCIe Gen4 x16. Launch overhead assumed "
                  "(task launch on CANN is slower than CUDA). Treat as an estimate.",
    },
    "ascend910c": {
        "name": "Huawei Ascend 910C",
        "hbm_bytes": 128 * GB,
        "peak_tflops": 780.0,
        "hbm_gbps": 3200.0,
        "host_link_gbps": 32.0,
        "launch_overhead_us": 10.0,
        "host_dram_bytes": 1536 * GiB,
        "source": "No public Huawei datasheet; TechPowerUp/DigiTimes (2025-04): BF16 "
                  "780 TFLOP/s, eight HBM2E stacks at 3.2 TB/s, 128 GB (two 910B dies). "
                  "Host link assumed PCIe Gen4 x16. Treat as an estimate.",
    },
    "cpu": {
        "name": "generic server CPU socket",
        "hbm_bytes": 256 * GiB,
        "peak_tflops": 3.0,
        "hbm_gbps": 200.0,
        "host_link_gbps": 200.0,
        "launch_overhead_us": 1.0,
        "host_dram_bytes": 256 * GiB,
        "source": "Order-of-magnitude figures for a 2-socket x86 server (DDR5, AVX-512); "
                  "memory is the host DRAM itself. For retrieval/pre-processing hosts.",
    },
}
