"""Hardware for the planner: the datasheet table. This machine's own figures are measured by
moegpt.hardware's probes; the ``local`` entry (moegpt.planner.local) uses the read figure as its
HBM bandwidth.

Precision selects the peak (PLANNER.md): 2-byte weights use BF16, 1-byte FP8/INT8, and 4-byte (fp32)
weights the fp32 peak. ``local`` measures its fp32 peak. PLANNER.md's datasheet table has no fp32
column, so the datasheet entries carry NVIDIA's dense *CUDA-core* FP32 figure (A100 19.5 TFLOP/s,
H100/H200 SXM 67 TFLOP/s), not the TF32 tensor-core one (156 / 494.7): PyTorch keeps TF32 matmuls off
by default (``torch.backends.cuda.matmul.allow_tf32 = False``), so fp32 weights run on CUDA cores.
An entry without an fp32 figure refuses 4-byte weights with a one-line error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# ---- the hardware table ------------------------------------------------------------------------
# Units: bytes, bytes/s, FLOP/s, bits/s. Peaks are dense (no 2:4 sparsity).


@dataclass(frozen=True, kw_only=True)
class PeakFlops:
    """Dense peak FLOP/s (or OP/s for int8) per precision; None where the chip has no such unit."""

    bf16: float
    fp8: float | None = None
    int8: float | None = None


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One accelerator as the planner sees it. ``measured_on`` is set for a measured entry (local)."""

    name: str
    mem_bytes: float  # device memory per GPU
    hbm_bytes_per_s: float  # memory bandwidth per GPU
    peak_flops: PeakFlops
    nvlink_bytes_per_s: float | None  # total bidirectional per GPU; None: no NVLink
    nic_bits_per_s_per_gpu: float | None  # scale-out network per GPU
    gpus_per_nvlink_domain: int  # TP is capped at this (article: 8-way TP, "the NVLink limit")
    measured_on: str | None = None  # ISO date of a measurement, for `local`
    peak_flops_fp32: float | None = None  # the peak for 4-byte (fp32) weights; None: refused

    @property
    def ridge_flop_per_byte(self) -> float:
        """BF16 FLOPs per byte of HBM traffic at which compute and memory take equal time."""
        return self.peak_flops.bf16 / self.hbm_bytes_per_s

    def peak_for(self, weight_bytes: float) -> float:
        """Precision selects the peak: fp32 for 4-byte weights (measured entries only), BF16 for 2-byte
        weights, else FP8 (H100) or INT8 (A100)."""
        if weight_bytes >= 4:
            if self.peak_flops_fp32 is None:
                raise ValueError(f"--weight-bytes {weight_bytes}: {self.name} has no fp32 peak (use 2, or "
                                 "--hardware local, which measures fp32)")
            return self.peak_flops_fp32
        if weight_bytes >= 2:
            return self.peak_flops.bf16
        eight_bit = self.peak_flops.fp8 or self.peak_flops.int8
        if eight_bit is None:
            raise ValueError(f"--weight-bytes {weight_bytes}: {self.name} has no 8-bit peak (use 2)")
        return eight_bit

    def to_dict(self) -> dict:
        return {
            "name": self.name, "mem_bytes": self.mem_bytes, "hbm_bytes_per_s": self.hbm_bytes_per_s,
            "peak_flops": asdict(self.peak_flops), "nvlink_bytes_per_s": self.nvlink_bytes_per_s,
            "nic_bits_per_s_per_gpu": self.nic_bits_per_s_per_gpu,
            "gpus_per_nvlink_domain": self.gpus_per_nvlink_domain,
            "ridge_flop_per_byte": self.ridge_flop_per_byte,
        }


GB, TB = 1e9, 1e12

# NVIDIA datasheets (SXM, dense): PLANNER.md's table; H200 from the H200 SXM datasheet (same
# Hopper compute as H100, 141 GB HBM3e at 4.8 TB/s).
DATASHEETS: dict[str, Hardware] = {
    "a100-40gb": Hardware(name="a100-40gb", mem_bytes=40 * GB, hbm_bytes_per_s=1555 * GB,
                          peak_flops=PeakFlops(bf16=312 * TB, int8=624 * TB), nvlink_bytes_per_s=600 * GB,
                          nic_bits_per_s_per_gpu=200e9, gpus_per_nvlink_domain=8, peak_flops_fp32=19.5 * TB),
    "a100-80gb": Hardware(name="a100-80gb", mem_bytes=80 * GB, hbm_bytes_per_s=2039 * GB,
                          peak_flops=PeakFlops(bf16=312 * TB, int8=624 * TB), nvlink_bytes_per_s=600 * GB,
                          nic_bits_per_s_per_gpu=200e9, gpus_per_nvlink_domain=8, peak_flops_fp32=19.5 * TB),
    "h100-sxm": Hardware(name="h100-sxm", mem_bytes=80 * GB, hbm_bytes_per_s=3350 * GB,
                         peak_flops=PeakFlops(bf16=989.4 * TB, fp8=1978.9 * TB, int8=1978.9 * TB),
                         nvlink_bytes_per_s=900 * GB, nic_bits_per_s_per_gpu=400e9, gpus_per_nvlink_domain=8,
                         peak_flops_fp32=67 * TB),
    "h200": Hardware(name="h200", mem_bytes=141 * GB, hbm_bytes_per_s=4800 * GB,
                     peak_flops=PeakFlops(bf16=989.4 * TB, fp8=1978.9 * TB, int8=1978.9 * TB),
                     nvlink_bytes_per_s=900 * GB, nic_bits_per_s_per_gpu=400e9, gpus_per_nvlink_domain=8,
                     peak_flops_fp32=67 * TB),
}
HARDWARE_NAMES = (*DATASHEETS, "local")


def datasheet(name: str) -> Hardware:
    """A datasheet entry by name (``local`` is measured: see moegpt.planner.local)."""
    try:
        return DATASHEETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose one of {list(HARDWARE_NAMES)}") from None
