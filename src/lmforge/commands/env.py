"""`lmforge env`: what lmforge found on this machine and the precision / kernels / threads it
chooses there, with the reason for each (lmforge.hardware)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option


@dataclass(kw_only=True)
class EnvConfig:
    json: bool = option(False, "print one JSON object instead of text")
    no_measure: bool = option(False, "skip the GEMM measurement (cached rates still show)")
    refresh: bool = option(False, "measure again instead of using the cached rates")


def run_env(cfg: EnvConfig) -> None:
    import json

    from .. import hardware

    caps = hardware.probe()
    if cfg.refresh or not cfg.no_measure:
        hardware.measured_rates(caps, refresh=cfg.refresh)
    choices = hardware.describe_choices(caps)
    if cfg.json:
        print(json.dumps({"capabilities": caps.to_dict(), "choices": choices}, indent=2))
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "unknown"  # noqa: E731
    quota = f"cgroup quota {caps.cgroup_cpus:g} CPUs" if caps.cgroup_cpus is not None else "no cgroup CPU quota"
    limit = f"cgroup limit {gib(caps.memory_limit_bytes)}" if caps.memory_limit_bytes else "no cgroup memory limit"
    gpus = "; ".join(f"{g.index}: {g.name}, compute capability {g.capability[0]}.{g.capability[1]}, "
                     f"{gib(g.memory_bytes)}, bf16 {'yes' if g.bf16 else 'no'}" for g in caps.gpus)
    lines = [
        f"CPU      {caps.cpu_model} ({caps.arch})",
        f"ISA      {' '.join(caps.isa) or 'none of AVX2/AVX512/AMX/NEON/SVE reported'}",
        f"bf16     {'native' if caps.native_bf16 else 'not native (emulated by torch)'}",
        f"torch    {caps.torch_version}, CPU kernels {caps.torch_capability}, CUDA {caps.torch_cuda or 'none'}",
        f"env      {' '.join(f'{k}={v}' for k, v in sorted(caps.env.items())) or 'no kernel-limiting variables set'}",
        f"cores    {caps.cores} usable ({caps.affinity_cores} in the affinity mask, {quota})",
        f"memory   {gib(caps.memory_bytes)} ({limit})",
        f"GPUs     {gpus or ('none' + (' (Apple MPS available)' if caps.mps else ''))}",
        f"rates    {hardware.rates_line(caps)} on one thread"
        + (" (measured once per machine, cached)" if caps.rates else " (--no-measure: none cached)"),
        "",
        "choices:",
    ]
    for row in choices:
        lines.append(f"  {row['setting']}: {row['choice']}\n      {row['why']}")
    print("\n".join(lines))
