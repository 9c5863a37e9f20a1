"""What this machine is, and the speed choices made from it.

lmforge was first tuned on a CPU with AVX512-BF16, where bf16 GEMMs run 4-5x faster than
fp32, and then ran 55-230x slower on AVX2-only CPUs, where torch emulates bf16 (issue 15).
Every choice that depends on the hardware is therefore made here, from one probe:

* :func:`probe` -> :class:`Capabilities`: CPU model and ISA flags (AVX2, AVX512, AVX512-BF16,
  AMX, NEON, SVE...), torch's kernel level (``get_cpu_capability()``) and the environment
  variables that limit it (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``), usable cores
  (affinity AND cgroup CPU quota), memory (and its cgroup limit), GPUs, the torch build.
* :func:`measured_rates`: a short GEMM measurement (fp32, bf16, and the int8/int4
  weight-only kernels of :mod:`lmforge.model.quant` with bf16 and fp32 activations), cached
  per machine under ``$LMFORGE_CACHE`` (else ``$XDG_CACHE_HOME/lmforge``, else
  ``~/.cache/lmforge``) and keyed by the CPU, its flags, the torch version, the kernel
  environment variables; measured on one thread (per-core rates: on a busy machine a second
  OpenMP thread waiting for a core makes a GEMV 10-100x slower, which would decide nothing).
* :func:`resolve_precision` (``auto`` -> fp32 | bf16 | fp16), :func:`inference_dtype`,
  :func:`kv_cache_dtype`, :func:`quant_activation_dtype`, :func:`newton_schulz_dtype`,
  :func:`cpu_threads`: the decisions, each a pure function of a :class:`Capabilities`, so
  tests pass fake ones (:func:`use_capabilities`).

A low-layer module: it imports torch and the standard library only (plus ``errors`` and
``fileio``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .fileio import atomic_write_json

#: The variables that cap which CPU kernels torch and oneDNN run, and so what TorchInductor
#: generates code for.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
#: Environment variables that change which kernels torch runs (so they key the rate cache).
#: MKL_ENABLE_INSTRUCTIONS caps MKL, which runs torch's fp32 GEMMs: measured on one core of the
#: Intel AMX host, 512^3 fp32 at 190 GFLOP/s, and 120 with MKL_ENABLE_INSTRUCTIONS=AVX2.
KERNEL_ENV = (*ISA_ENV, "ONEDNN_DEFAULT_FPMATH_MODE", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: /proc/cpuinfo flags (x86 "flags", ARM "Features") -> the names this module reports.
_ISA_NAMES = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8", "asimd": "NEON", "sve": "SVE", "sve2": "SVE2", "bf16": "BF16", "i8mm": "I8MM",
}

#: oneDNN's ISA levels in increasing order (its ``ONEDNN_MAX_CPU_ISA`` values); native bf16
#: GEMMs need AVX512_CORE_BF16 or above.
_ONEDNN_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                  "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                  "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


@dataclass
class GPUInfo:
    index: int
    name: str
    capability: tuple[int, int]  # CUDA compute capability
    bf16: bool  # native bf16 (Ampere, compute capability 8.0, and newer)
    memory_bytes: int


@dataclass
class Capabilities:
    """What :func:`probe` found. ``measurable`` is False for capabilities built by hand
    (tests, what-ifs): nothing is then measured, and decisions use the flags alone."""

    cpu_model: str = "unknown CPU"
    arch: str = field(default_factory=platform.machine)
    flags: tuple[str, ...] = ()  # raw /proc/cpuinfo flags, lower case
    torch_capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, SVE256, ...
    env: dict[str, str] = field(default_factory=dict)  # the KERNEL_ENV variables that are set
    cores: int = 1  # usable: affinity AND cgroup quota
    affinity_cores: int = 1
    cgroup_cpus: float | None = None  # the cgroup CPU quota in CPUs, None without one
    memory_bytes: int | None = None  # physical memory, or the cgroup limit when lower
    memory_limit_bytes: int | None = None  # the cgroup limit alone
    gpus: list[GPUInfo] = field(default_factory=list)
    mps: bool = False
    torch_version: str = torch.__version__
    torch_cuda: str | None = None
    rates: dict[str, float] | None = None  # measured_rates(): GFLOP/s by kernel
    measurable: bool = False

    # ---- what the flags say ----------------------------------------------------------
    @property
    def isa(self) -> list[str]:
        """The instruction sets of interest that the CPU reports, in a fixed order."""
        have = set(self.flags)
        return [name for flag, name in _ISA_NAMES.items() if flag in have]

    def has(self, *flags: str) -> bool:
        return any(f in self.flags for f in flags)

    @property
    def cpu_bf16_flags(self) -> bool:
        """The CPU itself has bf16 arithmetic (AVX512-BF16 or AMX-BF16 on x86, BF16 on ARM)."""
        return self.has("avx512_bf16", "amx_bf16") if self.arch in ("x86_64", "AMD64", "i686") else self.has("bf16")

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic that torch's CPU kernels actually use: the CPU has it, and neither
        torch's dispatch level (``ATEN_CPU_CAPABILITY``) nor oneDNN's (``ONEDNN_MAX_CPU_ISA``)
        is limited below it. An AVX512-BF16 CPU run with ``ATEN_CPU_CAPABILITY=avx2
        ONEDNN_MAX_CPU_ISA=AVX2`` reports the flags but emulates bf16 (measured on an Intel
        AMX host: 1.3 GFLOP/s in bf16 against 304 in fp32)."""
        if not self.cpu_bf16_flags:
            return False
        if self.arch in ("x86_64", "AMD64", "i686"):
            if not self.torch_capability.upper().startswith("AVX512"):
                return False
            limit = (self.env.get("ONEDNN_MAX_CPU_ISA") or self.env.get("DNNL_MAX_CPU_ISA") or "").upper()
            if limit and limit not in ("ALL", "DEFAULT"):
                if limit not in _ONEDNN_LEVELS:
                    return False  # an unknown limit: trust only a measurement
                return _ONEDNN_LEVELS.index(limit) >= _ONEDNN_LEVELS.index("AVX512_CORE_BF16")
        return True

    @property
    def bf16_speedup(self) -> float | None:
        """Measured bf16 GEMM rate over fp32's (None before a measurement)."""
        r = self.rates or {}
        if r.get("fp32") and r.get("bf16"):
            return r["bf16"] / r["fp32"]
        return None

    def fast_bf16_cpu(self) -> bool:
        """bf16 is worth it on this CPU: native (see :attr:`native_bf16`), or measured at least
        10% faster than fp32 (a CPU whose flags this probe does not know)."""
        if self.native_bf16:
            return True
        speedup = self.bf16_speedup
        return speedup is not None and speedup >= 1.1

    def line(self) -> str:
        """The capability line that benchmarks record beside their results."""
        parts = [self.cpu_model, f"{self.arch} {' '.join(self.isa) or 'no SIMD flags found'}",
                 f"torch {self.torch_version} kernels {self.torch_capability}"]
        if self.env:
            parts.append(" ".join(f"{k}={v}" for k, v in sorted(self.env.items())))
        cores = f"{self.cores} usable cores"
        if self.cgroup_cpus is not None:
            cores += f" (cgroup quota {self.cgroup_cpus:g})"
        parts.append(cores)
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.1f} GiB")
        parts.append("bf16 native" if self.native_bf16 else "bf16 emulated")
        for g in self.gpus:
            parts.append(f"GPU {g.index}: {g.name} (sm {g.capability[0]}.{g.capability[1]}, "
                         f"{g.memory_bytes / 2**30:.0f} GiB, bf16 {'yes' if g.bf16 else 'no'})")
        return " | ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["isa"] = self.isa
        d["native_bf16"] = self.native_bf16
        d["line"] = self.line()
        return d


# ------------------------------------------------------------------------------ the probe
def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, flags) from /proc/cpuinfo, else from platform."""
    text = _read("/proc/cpuinfo") or ""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if not model:
        model = platform.processor() or platform.machine() or "unknown CPU"
    if platform.machine() in ("arm64", "aarch64") and platform.system() == "Darwin":
        flags |= {"asimd"}  # Apple silicon: NEON always, no /proc/cpuinfo
    return model, tuple(sorted(f.lower() for f in flags))


def _cgroup_dirs() -> list[Path]:
    """The cgroup directories of this process, innermost first (v2 and v1 mounts)."""
    dirs: list[Path] = []
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        rel = parts[2].lstrip("/")
        controllers = parts[1].split(",")
        roots = [Path("/sys/fs/cgroup")] if parts[1] == "" else [
            Path("/sys/fs/cgroup") / c for c in controllers if c in ("cpu", "memory", "cpu,cpuacct")
        ] + [Path("/sys/fs/cgroup/cpu,cpuacct")]
        for root in roots:
            d = root / rel
            while True:
                dirs.append(d)
                if d == root:
                    break
                d = d.parent
    dirs.append(Path("/sys/fs/cgroup"))
    return list(dict.fromkeys(dirs))


def _cgroup_cpus() -> float | None:
    """The tightest CPU quota (v2 ``cpu.max``, or v1 ``cfs_quota_us / cfs_period_us``) over
    this process's cgroup and its parents, in CPUs; None without one."""
    best: float | None = None
    for d in _cgroup_dirs():
        quota = period = None
        fields = (_read(d / "cpu.max") or "").split()
        if fields:
            if fields[0] != "max":
                quota, period = float(fields[0]), float(fields[1]) if len(fields) > 1 else 100000.0
        else:
            q1, p1 = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if q1 and p1 and float(q1) > 0:
                quota, period = float(q1), float(p1)
        if quota and period:
            cpus = quota / period
            best = cpus if best is None else min(best, cpus)
    return best


def _memory() -> tuple[int | None, int | None]:
    """(physical memory in bytes, cgroup memory limit or None)."""
    total = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
    limit = None
    for d in _cgroup_dirs():
        for name in ("memory.max", "memory.limit_in_bytes"):
            text = (_read(d / name) or "").strip()
            if text.isdigit() and int(text) < (1 << 60):
                limit = int(text) if limit is None else min(limit, int(text))
    return total, limit


def _gpus() -> list[GPUInfo]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        # torch.cuda.is_bf16_supported() answers for the current device only; bf16 is native
        # from compute capability 8.0 (Ampere) on (emulated, and slow, before).
        out.append(GPUInfo(i, p.name, (p.major, p.minor), p.major >= 8, int(p.total_memory)))
    return out


def affinity_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _probe_uncached() -> Capabilities:
    model, flags = _cpuinfo()
    affinity = affinity_cores()
    quota = _cgroup_cpus()
    cores = affinity if quota is None else max(1, min(affinity, int(math.floor(quota + 1e-9))))
    total, limit = _memory()
    mem = min(x for x in (total, limit) if x is not None) if (total or limit) else None
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Capabilities(
        cpu_model=model,
        arch=platform.machine(),
        flags=flags,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        env={k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)},
        cores=cores,
        affinity_cores=affinity,
        cgroup_cpus=quota,
        memory_bytes=mem,
        memory_limit_bytes=limit,
        gpus=_gpus(),
        mps=mps,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        measurable=True,
    )


_PROBED: Capabilities | None = None
_OVERRIDE: list[Capabilities] = []


def probe(measure: bool = False) -> Capabilities:
    """This machine's capabilities (probed once per process). Rates already measured on this
    machine are read from the cache; ``measure=True`` measures them when the cache has none."""
    global _PROBED
    if _OVERRIDE:
        return _OVERRIDE[-1]
    if _PROBED is None:
        _PROBED = _probe_uncached()
        _PROBED.rates = _load_rates(_PROBED)
    if measure and _PROBED.rates is None:
        measured_rates(_PROBED)
    return _PROBED


@contextmanager
def use_capabilities(caps: Capabilities) -> Iterator[Capabilities]:
    """Make :func:`probe` return ``caps`` inside the block (tests fake machines with it)."""
    _OVERRIDE.append(caps)
    try:
        yield caps
    finally:
        _OVERRIDE.remove(caps)


# ------------------------------------------------------------------------------ measured rates
def cache_dir() -> Path:
    """Where per-machine measurements are kept: ``$LMFORGE_CACHE``, else
    ``$XDG_CACHE_HOME/lmforge``, else ``~/.cache/lmforge``."""
    env = os.environ.get("LMFORGE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmforge"


def _cache_file(caps: Capabilities) -> Path:
    key = {"cpu": caps.cpu_model, "flags": list(caps.flags), "torch": caps.torch_version,
           "capability": caps.torch_capability, "env": caps.env, "rates_version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "hardware" / f"{digest}.json"


def _load_rates(caps: Capabilities) -> dict[str, float] | None:
    text = _read(_cache_file(caps))
    if not text:
        return None
    try:
        rates = json.loads(text).get("rates")
    except ValueError:
        return None
    return {k: float(v) for k, v in rates.items()} if isinstance(rates, dict) else None


def _time_min(fn, budget_s: float) -> float:
    """The fastest of repeated calls (after one warm-up call) within about ``budget_s``: the
    minimum is what the kernel costs when nothing else competes for the cores."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < 2 or (time.perf_counter() - start < budget_s and reps < 200):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


#: Shapes of the measurement. GEMM: a 512 x 512 x 512 product, the order of a small model's
#: training GEMMs (64 tokens x 12 rows of a batch against 4*128..768 wide weights). GEMV: one
#: token through a 576 -> 1536 projection (SmolLM2-135M's MLP), what decoding runs.
GEMM_SHAPE = (512, 512, 512)
GEMV_SHAPE = (1, 576, 1536)


def _quant_kernels(w: torch.Tensor) -> dict:
    """The CPU weight-only kernels that :mod:`lmforge.model.quant` runs, on weight ``w``
    (N, K) quantized as it does (int8 per channel; int4 in groups of 32, the tinygemm
    ``(q - 8) * scale + zero`` convention): name -> callable(activations)."""
    n, k = w.shape
    scales8 = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q8 = torch.round(w / scales8[:, None]).clamp(-127, 127).to(torch.int8)
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale4 = ((hi - lo) / 15).clamp(min=1e-12)
    zero4 = lo + 8 * scale4
    q4 = torch.round((g - zero4[..., None]) / scale4[..., None]).add(8).clamp(0, 15).view(n, k).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.stack([scale4, zero4], dim=-1).transpose(0, 1).contiguous()  # (groups, N, 2)
    return {
        "int8": lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, scales8.to(x.dtype)),
        "int4": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz.to(x.dtype)),
    }


def measured_rates(caps: Capabilities | None = None, *, refresh: bool = False, budget_s: float = 0.15) -> dict[str, float]:
    """GFLOP/s on one core of this CPU: ``fp32`` and ``bf16`` GEMMs
    (:data:`GEMM_SHAPE`); ``gemv_fp32``, ``gemv_bf16`` and the weight-only kernels
    ``int8_bf16``, ``int8_fp32``, ``int4_bf16``, ``int4_fp32`` (kernel and activation dtype)
    at :data:`GEMV_SHAPE`. Measured once per machine (about 1-2 s; bf16 where it is emulated
    takes most of it) and cached (:func:`cache_dir`). Capabilities built by hand are never
    measured: their ``rates`` are returned as they are (or ``{}``)."""
    caps = caps or probe()
    if not caps.measurable:
        return dict(caps.rates or {})
    if caps.rates is not None and not refresh:
        return caps.rates
    if not refresh:
        cached = _load_rates(caps)
        if cached is not None:
            caps.rates = cached
            return cached
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rates: dict[str, float] = {}
    try:
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            m, k, n = GEMM_SHAPE
            a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                x, y = a.to(dtype), b.to(dtype)
                rates[name] = 2 * m * k * n / _time_min(lambda: torch.mm(x, y), budget_s) / 1e9
            m, k, n = GEMV_SHAPE
            x32 = torch.randn(m, k, generator=gen)
            w = torch.randn(n, k, generator=gen) * 0.02
            flops = 2 * m * k * n
            for name, dtype in (("gemv_fp32", torch.float32), ("gemv_bf16", torch.bfloat16)):
                xx, ww = x32.to(dtype), w.to(dtype)
                rates[name] = flops / _time_min(lambda: torch.nn.functional.linear(xx, ww), budget_s) / 1e9
            try:
                kernels = _quant_kernels(w)
            except (RuntimeError, AttributeError, NotImplementedError):  # a build without the kernels
                kernels = {}
            for method, fn in kernels.items():
                for act, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    xx = x32.to(dtype)
                    try:
                        rates[f"{method}_{act}"] = flops / _time_min(lambda: fn(xx), budget_s) / 1e9
                    except (RuntimeError, NotImplementedError):
                        pass  # this kernel does not take this activation dtype here
    finally:
        torch.set_num_threads(before)
    caps.rates = rates
    try:
        atomic_write_json(_cache_file(caps), {"key": {"cpu": caps.cpu_model, "torch": caps.torch_version,
                                                       "capability": caps.torch_capability, "env": caps.env,
                                                       "threads": 1},
                                              "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "rates": rates})
    except OSError:
        pass  # a read-only home: the rates stay in this process only
    return rates


def rates_line(caps: Capabilities | None = None) -> str:
    """The measured rates in one line (GFLOP/s), for benchmark records."""
    rates = measured_rates(caps)
    return ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " GFLOP/s" if rates else "no rates measured"


def benchmark_record(caps: Capabilities | None = None) -> dict[str, Any]:
    """What a benchmark stores beside its results: the capability line, the measured rates
    and the raw probe."""
    caps = caps or probe(measure=True)
    measured_rates(caps)
    return {"capability": caps.line(), "gemm_gflops": dict(caps.rates or {}), "probe": caps.to_dict()}


# ------------------------------------------------------------------------------ the choices
def device_type(device: str | torch.device | None) -> str:
    """``cpu``, ``cuda`` or ``mps`` for a device name (``auto`` and None: what training picks)."""
    if device is None or str(device) == "auto":
        caps = probe()
        if caps.gpus:
            return "cuda"
        return "mps" if caps.mps else "cpu"
    return torch.device(device).type


def _gpu(caps: Capabilities, device: str | torch.device | None) -> GPUInfo | None:
    if not caps.gpus:
        return None
    index = torch.device(device).index if device not in (None, "auto") else None
    return caps.gpus[index or 0] if (index or 0) < len(caps.gpus) else caps.gpus[0]


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def bf16_slowdown_note(caps: Capabilities) -> str:
    """How much slower bf16 is here, measured (one phrase)."""
    r = measured_rates(caps)
    if r.get("fp32") and r.get("bf16"):
        return (f"bf16 GEMMs measured {r['fp32'] / r['bf16']:.0f}x slower than fp32 here "
                f"({r['bf16']:.1f} against {r['fp32']:.1f} GFLOP/s)")
    return "bf16 is emulated in software here"


def resolve_precision(requested: str, device: str | torch.device | None = None, *,
                      caps: Capabilities | None = None, setting: str = "train.precision") -> str:
    """``auto`` -> ``bf16`` where bf16 is fast (a CUDA GPU with native bf16; a CPU with
    native bf16 that torch's kernels use, or measured faster than fp32), ``fp16`` on a CUDA
    GPU without bf16 (autocast + loss scaling), else ``fp32``. An explicit ``bf16`` on a CPU
    where it is slow is honoured with one warning that gives the measured slowdown; ``fp16``
    off CUDA is refused."""
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"{setting} must be auto, fp32, bf16 or fp16, got {requested!r}")
    caps = caps or probe()
    kind = device_type(device)
    if kind == "cuda":
        gpu = _gpu(caps, device)
        bf16 = gpu.bf16 if gpu is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16 else "fp16"
        return requested
    if requested == "fp16":
        raise ConfigError(f"{setting}=fp16 needs a CUDA GPU; use auto or bf16 on {kind}")
    if kind == "mps":  # not measured here: full precision unless asked
        return "fp32" if requested == "auto" else requested
    if requested == "auto":
        if caps.native_bf16:
            return "bf16"
        if caps.measurable and caps.rates is None and caps.arch not in ("x86_64", "AMD64", "i686"):
            measured_rates(caps)  # a CPU whose flags this probe may not know (Apple silicon): ask it
        return "bf16" if caps.fast_bf16_cpu() else "fp32"
    if requested == "bf16" and not caps.fast_bf16_cpu():
        _warn_once("bf16-cpu", f"{setting}=bf16 on a CPU without native bf16 ({caps.cpu_model}, torch kernels "
                   f"{caps.torch_capability}): {bf16_slowdown_note(caps)}; {setting}=auto picks fp32 here")
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def inference_dtype(requested: str, device: str | torch.device | None = "cpu", *, quantized: bool = False,
                    caps: Capabilities | None = None) -> torch.dtype:
    """The compute dtype of generation/serving/eval (``--dtype``: auto, float32, bfloat16,
    float16). ``auto``: on a GPU bf16 (fp16 without native bf16); on a CPU fp32, except a
    weight-quantized model on a CPU with fast bf16, which runs in bf16 so its activations
    reach the int8/int4 kernels without casts. Full-precision models stay fp32 on a CPU:
    bf16 changes greedy outputs (BENCHMARKS.md), so it is opt-in (``--quantize bf16``)."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested != "auto" and requested not in names:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    caps = caps or probe()
    kind = device_type(device)
    if requested != "auto":
        if requested == "bfloat16" and kind == "cpu" and not caps.fast_bf16_cpu():
            _warn_once("bf16-infer", f"--dtype bfloat16 on a CPU without native bf16 ({caps.cpu_model}): "
                       f"{bf16_slowdown_note(caps)}; --dtype auto picks float32 here")
        return names[requested]
    if kind == "cuda":
        gpu = _gpu(caps, device)
        return torch.bfloat16 if gpu is None or gpu.bf16 else torch.float16
    if kind == "cpu" and quantized and caps.fast_bf16_cpu():
        return torch.bfloat16
    return torch.float32


def kv_cache_dtype(model_dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The KV cache holds fp32 on a CPU whatever the model's dtype: one query attending over
    the cache (sdpa) measured 10 us per SmolLM2 layer in fp32 against 41 us in bf16 on an
    AVX512-BF16 CPU; where bf16 is emulated (AVX2) bf16 is slower still. On a GPU the cache
    follows the model (half the memory, fast bf16/fp16 attention)."""
    return torch.float32 if torch.device(device).type == "cpu" else model_dtype


def quant_activation_dtype(method: str, caps: Capabilities | None = None) -> torch.dtype:
    """The activation dtype fed to the CPU int8/int4 weight-only kernel: fp32 where it measured
    more than 1.2x faster than bf16 here (both kernels accept both), else bf16. Measured on
    one core of the Intel AMX host at one decode token (576 -> 1536), GFLOP/s: int8 36 with
    bf16 activations against 3.3 with fp32, int4 32 against 1.2; the same host as AVX2
    (emulated bf16): int8 30 against 3.5, int4 19 against 1.2. The kernels widen bf16
    inputs in their own vector loops (no bf16 GEMM), so bf16 wins on both."""
    caps = caps or probe()
    r = caps.rates or {}  # measured by `lmforge env` (or read from its cache); never measured in a forward
    bf16, fp32 = r.get(f"{method}_bf16"), r.get(f"{method}_fp32")
    if bf16 is not None and fp32 is not None and fp32 > 1.2 * bf16:  # a clear margin: the rates are short measurements
        return torch.float32
    return torch.bfloat16


def gemm_dtype(caps: Capabilities | None = None) -> torch.dtype:
    """The dtype of the dense GEMM a quantized layer runs for many rows (prefill, QLoRA
    training): bf16 where bf16 is fast, else fp32 (the weights are dequantized to it)."""
    caps = caps or probe()
    return torch.bfloat16 if caps.fast_bf16_cpu() else torch.float32


def isolate_compile_cache() -> str | None:
    """Give ``torch.compile`` a cache directory of its own when the kernel level is capped
    (``ATEN_CPU_CAPABILITY=avx2`` ...), unless ``TORCHINDUCTOR_CACHE_DIR`` is already set.

    torch 2.13's inductor cache key ignores these variables: kernels compiled under
    ``ATEN_CPU_CAPABILITY=avx2`` and then loaded without it (the same machine, the same cache
    directory) crashed the process with a segmentation fault inside the compiled step
    (reproduced with tests/test_engine.py::test_torch_compile_trains_like_eager). Returns the
    directory chosen, or None where nothing was changed."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the variable the first time it looks (cache_dir()), so
    # only a value other than the default is someone's choice
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return None
    capped = sorted((k, os.environ[k]) for k in ISA_ENV if os.environ.get(k))
    if not capped:
        return None
    tag = "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", f"{k}_{v}") for k, v in capped)
    path = f"{default_cache_dir()}-{tag}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def newton_schulz_dtype(device: str | torch.device, caps: Capabilities | None = None) -> torch.dtype:
    """Muon's Newton-Schulz iterations run in bf16 (as torch.optim.Muon does) where bf16 is
    fast, in fp32 elsewhere."""
    kind = torch.device(device).type
    caps = caps or probe()
    if kind == "cuda":
        gpu = _gpu(caps, device)
        return torch.bfloat16 if gpu is None or gpu.bf16 else torch.float32
    if kind == "cpu" and caps.fast_bf16_cpu():
        return torch.bfloat16
    return torch.float32


def cpu_threads(requested: int | None = 0, *, caps: Capabilities | None = None,
                local_world_size: int | None = None) -> int:
    """Threads for this process: ``requested`` when set (> 0); else ``LMFORGE_THREADS`` when
    set; else the usable cores (affinity and cgroup quota) split over the processes torchrun
    started on this node (``LOCAL_WORLD_SIZE``). At least 1, never more than the usable cores
    (torch's own default counts the machine's cores, ignoring a container's CPU quota)."""
    caps = caps or probe()
    cores = max(1, caps.cores)
    if requested is not None and requested < 0:
        raise ConfigError(f"a thread count must be at least 1 (0: automatic), got {requested}")
    if not requested:
        env = os.environ.get("LMFORGE_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ConfigError(f"LMFORGE_THREADS must be a number of threads >= 1, got {env!r}")
            requested = int(env)
    if requested:
        return min(requested, cores)
    if local_world_size is None:
        raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
        local_world_size = int(raw) if raw.isdigit() and int(raw) > 0 else 1
    return max(1, cores // local_world_size)


def _cpu_times() -> tuple[float, float, float, int] | None:
    """(busy seconds of all CPUs, total seconds of all CPUs, this process's CPU seconds, CPUs
    counted) from /proc/stat and os.times(); None where /proc/stat is missing."""
    text = _read("/proc/stat")
    if not text:
        return None
    lines = text.splitlines()
    fields = [float(x) for x in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    own = os.times()
    total = sum(fields[:8])
    return (total - idle) / hz, total / hz, own.user + own.system, max(1, cpus)


class LoadWatcher:
    """Threads for a process on a machine other processes may also be using.

    With libgomp (PyTorch's CPU wheels), every parallel region ends at a barrier that waits
    for all its threads; a thread that shares its core with another busy process is scheduled
    a fraction of the time, so each small op waits for the scheduler (BENCHMARKS.md,
    "Threads on a busy machine"). The watcher measures the CPUs other processes used since
    its last look (all CPUs' busy time from /proc/stat minus this process's own) and gives
    the threads that leave them their cores: ``usable cores - others`` rounded, at least 1, at
    most the automatic choice of :func:`cpu_threads`. A fixed request (train.threads,
    ``LMFORGE_THREADS``) is left alone."""

    def __init__(self, requested: int | None = 0, caps: Capabilities | None = None) -> None:
        self.caps = caps or probe()
        self.requested = requested
        self.limit = cpu_threads(requested, caps=self.caps)
        self.fixed = bool(requested) or bool(os.environ.get("LMFORGE_THREADS"))
        self._last = _cpu_times()

    def others(self) -> float | None:
        """CPUs busy with other processes since the last call (None without /proc/stat, or
        when no time passed)."""
        now = _cpu_times()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        cpus = now[3]
        busy = (now[0] - last[0]) / (now[1] - last[1]) * cpus  # CPUs busy, all processes
        return max(0.0, busy - (now[2] - last[2]) / ((now[1] - last[1]) / cpus))

    def threads(self) -> int:
        """The threads to use now."""
        if self.fixed:
            return self.limit
        others = self.others()
        if others is None:
            return self.limit
        free = self.caps.cores - others
        return max(1, min(self.limit, int(math.floor(free + 0.5))))


def use_threads(requested: int | None = 0) -> int:
    """Set torch's CPU threads to :func:`cpu_threads` of ``requested`` (0/None: automatic)."""
    n = cpu_threads(requested)
    torch.set_num_threads(n)
    return n


def math_attention_wins(caps: Capabilities | None = None) -> bool:
    """Whether plain matmul attention beats sdpa under CPU bf16 autocast: where bf16 GEMMs are
    fast. Forward+backward, one thread, torch 2.13, ms: on the Intel AMX host at (12, 4, 64, 32)
    sdpa bf16 8.29, matmul bf16 1.16 (sdpa fp32 1.48); at (4, 12, 256, 64) 33.2 against 15.0.
    The same host as AVX2 (emulated bf16): sdpa bf16 6.78 against matmul bf16 17.4, and 183
    against 401 at the larger shape, so sdpa stays there."""
    return (caps or probe()).fast_bf16_cpu()


def describe_choices(caps: Capabilities | None = None) -> list[dict[str, str]]:
    """Every hardware-dependent choice lmforge makes on ``caps``, with the reason: what
    ``lmforge env`` prints. Rows: ``{"setting", "choice", "why"}``."""
    caps = caps or probe()
    rows: list[dict[str, str]] = []

    def add(setting: str, choice: str, why: str) -> None:
        rows.append({"setting": setting, "choice": choice, "why": why})

    r = caps.rates or {}
    if caps.native_bf16:
        bf16_why = "the CPU has native bf16 (" + ", ".join(i for i in caps.isa if "BF16" in i) + ") and torch's kernels use it"
    elif caps.fast_bf16_cpu():
        bf16_why = f"bf16 GEMMs measured {caps.bf16_speedup:.1f}x faster than fp32 here"
    else:
        bf16_why = ("no native bf16 on this CPU" if not caps.cpu_bf16_flags else
                    f"the CPU has bf16 but torch's kernels are limited to {caps.torch_capability}"
                    + (f" ({' '.join(f'{k}={v}' for k, v in sorted(caps.env.items()))})" if caps.env else ""))
        if r.get("fp32") and r.get("bf16"):
            bf16_why += f": {bf16_slowdown_note(caps)}"
    cpu_precision = resolve_precision("auto", "cpu", caps=caps)
    add("train.precision=auto (pretrain, finetune, adversarial, prune recovery) on cpu", cpu_precision, bf16_why)
    for gpu in caps.gpus:
        choice = "bf16" if gpu.bf16 else "fp16"
        add(f"train.precision=auto on cuda:{gpu.index}", choice,
            f"{gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]}: "
            + ("native bf16" if gpu.bf16 else "no native bf16 (before Ampere): fp16 autocast with loss scaling"))
    frozen = {"bf16": "bf16", "fp16": "fp16"}.get(cpu_precision, "fp32")
    add("frozen base of LoRA/QLoRA-style PEFT on cpu", frozen,
        "stored in the autocast dtype (autocast would re-cast fp32 frozen weights at every use)"
        if frozen != "fp32" else "no autocast: the frozen weights stay fp32")
    ns = newton_schulz_dtype("cpu", caps)
    add("Muon Newton-Schulz iterations on cpu", "bf16" if ns == torch.bfloat16 else "fp32",
        "as torch.optim.Muon (bf16 is fast here)" if ns == torch.bfloat16
        else "lmforge's own fp32 iterations: torch.optim.Muon's bf16 ones would be emulated")
    add("attention in training on cpu",
        "matmul attention under bf16 (contexts <= 1024), sdpa otherwise" if math_attention_wins(caps) else "sdpa",
        "bf16 GEMMs are fast: matmul attention beats sdpa's bf16 kernels" if math_attention_wins(caps)
        else "sdpa (fp32, or bf16 when asked) beats matmul attention where bf16 GEMMs are slow")
    add("eval --precision auto on cpu", cpu_precision, bf16_why)
    add("generate/chat/serve --dtype auto on cpu, full-precision model", "float32",
        "exact (bf16 changes greedy outputs); --quantize bf16 opts in")
    qdtype = inference_dtype("auto", "cpu", quantized=True, caps=caps)
    add("generate/chat/serve --dtype auto on cpu, int8/int4 model", str(qdtype).replace("torch.", ""),
        "bf16 is fast here: activations reach the kernels without casts" if qdtype == torch.bfloat16
        else "bf16 is slow here: the model runs in fp32 and only the kernels' inputs are cast")
    for method in ("int8", "int4"):
        act = quant_activation_dtype(method, caps)
        rate = ", ".join(f"{a} activations {r[f'{method}_{a}']:.2f} GFLOP/s" for a in ("bf16", "fp32")
                         if f"{method}_{a}" in r)
        add(f"{method} weight-only kernel activations (decode)", str(act).replace("torch.", ""),
            f"the faster measured here ({rate})" if rate else "not measured: bf16, the kernels' fast path on x86")
    gd = gemm_dtype(caps)
    add("int8/int4 layers over many rows (prefill, QLoRA training)", f"dequantize to {str(gd).replace('torch.', '')} + GEMM",
        "bf16 GEMMs are fast here" if gd == torch.bfloat16 else "fp32 GEMMs: bf16 ones are slow here")
    add("KV cache on cpu", "float32", "one query over the cache: 10 us per SmolLM2 layer in fp32 against 41 us in "
        "bf16 (AVX512-BF16); slower still where bf16 is emulated")
    threads = cpu_threads(caps=caps)
    why = f"usable cores: {caps.affinity_cores} in the affinity mask"
    if caps.cgroup_cpus is not None:
        why += f", cgroup quota {caps.cgroup_cpus:g} CPUs"
    lws = os.environ.get("LOCAL_WORLD_SIZE")
    if os.environ.get("LMFORGE_THREADS"):
        why = f"LMFORGE_THREADS={os.environ['LMFORGE_THREADS']} (at most the usable cores, {caps.cores})"
    elif lws and lws != "1":
        why += f", split over torchrun's {lws} local processes"
    add("CPU threads per process", str(threads), why)
    return rows
