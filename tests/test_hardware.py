"""The capability probe and every choice made from it, on faked machines (conftest.MACHINES):
no code path picks bf16 on a CPU without native bf16 unless asked; `lmforge env`."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import MACHINES, TINY_PRETRAIN

from lmforge import hardware
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.hardware import use_capabilities

NO_BF16 = ("avx2", "amx-as-avx2", "avx512", "arm")
FAST_BF16 = ("avx512-bf16", "amx", "arm-bf16")


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("name", NO_BF16)
def test_auto_is_fp32_on_cpus_without_native_bf16(name: str) -> None:
    caps = MACHINES[name]
    assert not caps.native_bf16
    assert hardware.resolve_precision("auto", "cpu", caps=caps) == "fp32"
    assert hardware.inference_dtype("auto", "cpu", quantized=True, caps=caps) == torch.float32
    assert hardware.newton_schulz_dtype("cpu", caps) == torch.float32
    assert hardware.gemm_dtype(caps) == torch.float32
    assert not hardware.math_attention_wins(caps)


@pytest.mark.parametrize("name", FAST_BF16)
def test_auto_is_bf16_on_cpus_with_native_bf16(name: str) -> None:
    caps = MACHINES[name]
    assert caps.native_bf16
    assert hardware.resolve_precision("auto", "cpu", caps=caps) == "bf16"
    assert hardware.inference_dtype("auto", "cpu", quantized=True, caps=caps) == torch.bfloat16
    assert hardware.newton_schulz_dtype("cpu", caps) == torch.bfloat16
    assert hardware.gemm_dtype(caps) == torch.bfloat16
    assert hardware.math_attention_wins(caps)


@pytest.mark.parametrize("name", [*NO_BF16, *FAST_BF16])
def test_full_precision_models_decode_in_fp32_on_every_cpu(name: str) -> None:
    """bf16 changes greedy outputs, so a full-precision model is never cast unless asked."""
    assert hardware.inference_dtype("auto", "cpu", quantized=False, caps=MACHINES[name]) == torch.float32
    assert hardware.kv_cache_dtype(torch.bfloat16, "cpu") == torch.float32


def test_the_emulation_env_vars_limit_native_bf16() -> None:
    """The AMX host's flags with torch at AVX512 but oneDNN capped below bf16 is not native; at
    AVX512_CORE_AMX (or no cap) it is; an unknown cap trusts only a measurement."""
    amx = MACHINES["amx"]
    assert not replace(amx, env={"ONEDNN_MAX_CPU_ISA": "AVX2"}).native_bf16
    assert not replace(amx, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}).native_bf16
    assert replace(amx, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).native_bf16
    assert replace(amx, env={"ONEDNN_MAX_CPU_ISA": "ALL"}).native_bf16
    assert not replace(amx, env={"ONEDNN_MAX_CPU_ISA": "SOMETHING_NEW"}).native_bf16
    assert not replace(amx, torch_capability="AVX2").native_bf16


def test_a_measured_speedup_makes_bf16_fast_without_flags() -> None:
    """A CPU whose flags the probe does not know: bf16 only when measured >= 1.1x fp32."""
    caps = replace(MACHINES["arm"], rates={"fp32": 100.0, "bf16": 300.0})
    assert hardware.resolve_precision("auto", "cpu", caps=caps) == "bf16"
    caps = replace(MACHINES["arm"], rates={"fp32": 100.0, "bf16": 105.0})
    assert hardware.resolve_precision("auto", "cpu", caps=caps) == "fp32"


def test_gpus_bf16_on_ampere_fp16_before() -> None:
    assert hardware.resolve_precision("auto", "cuda", caps=MACHINES["cuda-bf16"]) == "bf16"
    assert hardware.resolve_precision("auto", "cuda", caps=MACHINES["cuda-fp16"]) == "fp16"
    assert hardware.inference_dtype("auto", "cuda", caps=MACHINES["cuda-bf16"]) == torch.bfloat16
    assert hardware.inference_dtype("auto", "cuda", caps=MACHINES["cuda-fp16"]) == torch.float16
    assert hardware.newton_schulz_dtype("cuda", MACHINES["cuda-fp16"]) == torch.float32
    # the machine with the GPU still trains on its CPU in fp32 when told to use it
    assert hardware.resolve_precision("auto", "cpu", caps=MACHINES["cuda-bf16"]) == "fp32"
    with use_capabilities(MACHINES["cuda-fp16"]):
        assert hardware.device_type("auto") == "cuda"
        assert hardware.resolve_precision("auto", "auto") == "fp16"


def test_explicit_bf16_on_a_slow_cpu_runs_with_one_warning_giving_the_slowdown() -> None:
    caps = replace(MACHINES["avx2"], rates={"fp32": 150.0, "bf16": 2.0})
    hardware._WARNED.discard("bf16-cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hardware.resolve_precision("bf16", "cpu", caps=caps) == "bf16"
        assert hardware.resolve_precision("bf16", "cpu", caps=caps) == "bf16"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "75x slower than fp32" in messages[0] and "2.0 against 150.0 GFLOP/s" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where bf16 is native
        assert hardware.resolve_precision("bf16", "cpu", caps=MACHINES["amx"]) == "bf16"


def test_bad_precisions_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        hardware.resolve_precision("fp16", "cpu", caps=MACHINES["amx"])
    with pytest.raises(ConfigError, match="must be auto, fp32, bf16 or fp16"):
        hardware.resolve_precision("half", "cpu", caps=MACHINES["amx"])
    with pytest.raises(ConfigError, match="dtype must be auto"):
        hardware.inference_dtype("half", "cpu", caps=MACHINES["amx"])


# ------------------------------------------------------------------------------ quantized kernels
def test_quant_activation_dtype_follows_the_measurement() -> None:
    base = MACHINES["avx2"]
    assert hardware.quant_activation_dtype("int4", base) == torch.bfloat16  # not measured: the kernels' fast path
    fp32_faster = replace(base, rates={"int4_bf16": 1.0, "int4_fp32": 5.0, "int8_bf16": 30.0, "int8_fp32": 3.0})
    assert hardware.quant_activation_dtype("int4", fp32_faster) == torch.float32
    assert hardware.quant_activation_dtype("int8", fp32_faster) == torch.bfloat16
    close = replace(base, rates={"int8_bf16": 10.0, "int8_fp32": 11.0})  # within the 1.2x margin: keep bf16
    assert hardware.quant_activation_dtype("int8", close) == torch.bfloat16


def test_quantized_layers_run_fp32_gemms_where_bf16_is_slow(monkeypatch) -> None:
    """Prefill through an int8 layer dequantizes to fp32 on the AVX2 machine (bf16 there is
    emulated) and to bf16 on the AMX one; decode feeds the kernel bf16 on both."""
    from lmforge.model import quant

    seen: list[torch.dtype] = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(w.dtype)
        return real_linear(x, w, b)

    torch.manual_seed(0)
    layer = quant.Int8Linear.from_weight(torch.randn(32, 64) * 0.1)
    x = torch.randn(100, 64)
    monkeypatch.setattr(quant.F, "linear", spy)
    for name, expected in (("avx2", torch.float32), ("amx", torch.bfloat16)):
        with use_capabilities(MACHINES[name]):
            seen.clear()
            y = layer(x)
            assert seen == [expected] and y.dtype == torch.float32
            one = layer(x[:1])  # decode: the fused kernel, no F.linear
            assert seen == [expected]
            torch.testing.assert_close(one, y[:1], atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------ threads
def test_threads_follow_usable_cores_and_torchrun(monkeypatch) -> None:
    monkeypatch.delenv("LMFORGE_THREADS", raising=False)
    caps = replace(MACHINES["avx2"], cores=8)
    assert hardware.cpu_threads(caps=caps, local_world_size=1) == 8
    assert hardware.cpu_threads(caps=caps, local_world_size=2) == 4
    assert hardware.cpu_threads(caps=caps, local_world_size=16) == 1
    assert hardware.cpu_threads(16, caps=caps) == 8  # never more threads than cores
    assert hardware.cpu_threads(3, caps=caps) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert hardware.cpu_threads(caps=caps) == 2
    monkeypatch.setenv("LMFORGE_THREADS", "1")
    assert hardware.cpu_threads(caps=caps) == 1
    monkeypatch.setenv("LMFORGE_THREADS", "many")
    with pytest.raises(ConfigError, match="LMFORGE_THREADS"):
        hardware.cpu_threads(caps=caps)


def test_the_probe_reads_cgroup_quota_and_cpuinfo(monkeypatch) -> None:
    """A container limited to 1.5 CPUs on a 4-core affinity mask has 1 usable core; ARM's
    'Features' line gives NEON/SVE/BF16; the cgroup memory limit caps the memory."""
    files = {
        "/proc/cpuinfo": "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n",
        "/proc/self/cgroup": "0::/job\n",
        "/sys/fs/cgroup/job/cpu.max": "150000 100000\n",
        "/sys/fs/cgroup/cpu.max": "max 100000\n",
        "/proc/meminfo": "MemTotal:       16384000 kB\n",
        "/sys/fs/cgroup/job/memory.max": str(4 * 2**30) + "\n",
    }
    monkeypatch.setattr(hardware, "_read", lambda p: files.get(str(p)))
    monkeypatch.setattr(hardware, "affinity_cores", lambda: 4)
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    caps = hardware._probe_uncached()
    assert caps.cgroup_cpus == pytest.approx(1.5) and caps.cores == 1 and caps.affinity_cores == 4
    assert caps.isa == ["NEON", "SVE", "BF16", "I8MM"] and caps.native_bf16
    assert caps.memory_limit_bytes == 4 * 2**30 and caps.memory_bytes == 4 * 2**30
    files["/sys/fs/cgroup/job/cpu.max"] = "max 100000\n"
    assert hardware._probe_uncached().cores == 4


# ------------------------------------------------------------------------------ measurement
def test_rates_are_measured_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    caps = replace(hardware.probe(), rates=None)
    rates = hardware.measured_rates(caps, budget_s=0.01)
    assert {"fp32", "bf16", "gemv_fp32", "gemv_bf16"} <= set(rates) and all(v > 0 for v in rates.values())
    cached = list((tmp_path / "hardware").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["rates"] == rates

    def no_timing(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(hardware, "_time_min", no_timing)
    assert hardware.measured_rates(replace(caps, rates=None)) == rates
    # another torch kernel level (ATEN_CPU_CAPABILITY) is another cache entry
    other = replace(caps, rates=None, env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert hardware._cache_file(other) != hardware._cache_file(caps)
    assert hardware.measured_rates(replace(MACHINES["avx2"], rates=None)) == {}  # faked: never measured


def test_capability_line_names_cpu_isa_kernels_and_bf16() -> None:
    line = MACHINES["amx-as-avx2"].line()
    assert "Intel(R) Xeon(R) Processor" in line and "AMX-BF16" in line and "kernels AVX2" in line
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in line and "bf16 emulated" in line
    assert "bf16 native" in MACHINES["amx"].line()


# ------------------------------------------------------------------------------ choices in use
@pytest.mark.parametrize("name,expected", [("avx2", "fp32"), ("amx-as-avx2", "fp32"), ("amx", "bf16")])
def test_training_engine_picks_from_the_machine(tiny_data: Path, tmp_path: Path, name: str, expected: str) -> None:
    """`precision: auto` (the default) trains in fp32 on AVX2 machines and bf16 on AMX; Muon's
    Newton-Schulz dtype follows; the choice is in summary.json."""
    argv = ["pretrain", f"data={tiny_data}", f"out_dir={tmp_path / 'run'}",
            *[a for a in TINY_PRETRAIN if not a.startswith("train.precision")],
            "train.max_steps=2", "train.optimizer=muon", "log.report=false"]
    from lmforge.train import optim

    made: list[torch.dtype] = []
    real = optim.Muon.__init__

    def spy(self, params, **kw):
        made.append(kw["ns_dtype"])
        real(self, params, **kw)

    with use_capabilities(MACHINES[name]), pytest.MonkeyPatch.context() as mp:
        mp.setattr(optim.Muon, "__init__", spy)
        assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == expected
    assert made == [torch.bfloat16 if expected == "bf16" else torch.float32]


def test_lora_frozen_base_stays_fp32_without_fast_bf16(tiny_data: Path, tmp_path: Path) -> None:
    """The frozen base of a PEFT run is stored in the autocast dtype only where bf16 is fast."""
    import lmforge.train.finetune as ft
    from conftest import save_tiny_llama

    from lmforge.config import from_dict

    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=128, init_std=0.05)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                         {"role": "assistant", "content": f"hello {i}"}]})
                               for i in range(8)) + "\n")
    stored: dict[str, list[torch.dtype]] = {}
    for name in ("avx2", "amx"):
        cfg = from_dict(ft.FinetuneConfig, {
            "base": str(base), "out_dir": str(tmp_path / name), "objective": "sft",
            "data": {"train": [str(data)], "val_fraction": 0.25}, "peft": {"method": "lora", "r": 2},
            "train": {"max_steps": 1, "micro_batch_size": 2, "threads": 1, "device": "cpu", "eval_interval": 0},
            "log": {"console": False, "tensorboard": False, "report": False}})
        seen: list[torch.dtype] = []
        real = ft.store_frozen_in
        with use_capabilities(MACHINES[name]), pytest.MonkeyPatch.context() as mp:
            mp.setattr(ft, "store_frozen_in", lambda m, d, seen=seen: (seen.append(d), real(m, d)))
            ft.run_finetune(cfg)
        stored[name] = seen
    assert stored == {"avx2": [], "amx": [torch.bfloat16]}


def test_load_engine_auto_dtype_per_machine(tiny_checkpoint: Path) -> None:
    from lmforge.infer.engine import load_engine

    for name, expected in (("avx2", torch.float32), ("amx", torch.bfloat16)):
        with use_capabilities(MACHINES[name]):
            q = load_engine(str(tiny_checkpoint), quantize="int8")
            plain = load_engine(str(tiny_checkpoint))
        assert q.model.embed_tokens.weight.dtype == expected
        assert plain.model.embed_tokens.weight.dtype == torch.float32
        assert q.cache.k.dtype == torch.float32 and plain.cache.k.dtype == torch.float32


# ------------------------------------------------------------------------------ lmforge env
def test_env_json_and_text_with_faked_machines(capsys, monkeypatch) -> None:
    monkeypatch.delenv("LMFORGE_THREADS")
    rows = {}
    for name in ("avx2", "amx", "cuda-fp16"):
        with use_capabilities(replace(MACHINES[name], rates={"fp32": 150.0, "bf16": 2.0} if name == "avx2" else None)):
            assert main(["env", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["capabilities"]["cpu_model"] == MACHINES[name].cpu_model
        rows[name] = {r["setting"]: r for r in out["choices"]}
    train = "train.precision=auto (pretrain, finetune, adversarial, prune recovery) on cpu"
    assert rows["avx2"][train]["choice"] == "fp32" and "75x slower" in rows["avx2"][train]["why"]
    assert rows["amx"][train]["choice"] == "bf16" and "AMX-BF16" in rows["amx"][train]["why"]
    assert rows["cuda-fp16"]["train.precision=auto on cuda:0"]["choice"] == "fp16"
    assert rows["avx2"]["Muon Newton-Schulz iterations on cpu"]["choice"] == "fp32"
    assert rows["amx"]["attention in training on cpu"]["choice"].startswith("matmul")
    assert rows["avx2"]["attention in training on cpu"]["choice"] == "sdpa"
    assert rows["avx2"]["CPU threads per process"]["choice"] == "8"
    with use_capabilities(MACHINES["amx-as-avx2"]):
        assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "bf16     not native" in text and "ONEDNN_MAX_CPU_ISA=AVX2" in text
    assert "torch's kernels are limited to AVX2" in text


def test_env_measures_this_machine(capsys) -> None:
    assert main(["env", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    caps = out["capabilities"]
    assert caps["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert caps["rates"]["fp32"] > 0 and caps["cores"] >= 1
    assert out["capabilities"]["line"] == hardware.probe().line()


def test_load_watcher_leaves_busy_cores_to_other_processes(monkeypatch) -> None:
    """2 usable cores; in each 10 s window the machine's CPUs are busy for `busy` CPU-seconds,
    this process for `own`: the threads are the cores the others leave free (at least 1)."""
    monkeypatch.delenv("LMFORGE_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    clock = {"busy": 0.0, "total": 0.0, "own": 0.0}

    def window(busy: float, own: float) -> None:  # 10 s on 2 CPUs
        clock["busy"] += busy
        clock["total"] += 20.0
        clock["own"] += own

    monkeypatch.setattr(hardware, "_cpu_times", lambda: (clock["busy"], clock["total"], clock["own"], 2))
    caps = replace(MACHINES["avx2"], cores=2)
    w = hardware.LoadWatcher(0, caps)
    window(busy=20.0, own=10.0)  # another process holds a core: one thread
    assert w.threads() == 1
    window(busy=20.0, own=10.0)  # still there (our one thread uses the other core)
    assert w.threads() == 1
    window(busy=10.0, own=10.0)  # gone: both cores
    assert w.threads() == 2
    window(busy=17.0, own=14.0)  # a light job (0.3 of a core): keep both
    assert w.threads() == 2
    window(busy=20.0, own=0.0)  # two busy processes on two cores: still one thread, never zero
    assert w.threads() == 1
    assert hardware.LoadWatcher(2, caps).fixed and hardware.LoadWatcher(2, caps).threads() == 2
    monkeypatch.setenv("LMFORGE_THREADS", "2")
    fixed = hardware.LoadWatcher(0, caps)
    window(busy=20.0, own=0.0)
    assert fixed.fixed and fixed.threads() == 2


def test_compile_cache_is_keyed_by_the_kernel_level(monkeypatch) -> None:
    """Kernels compiled under ATEN_CPU_CAPABILITY=avx2 and loaded without it crashed the process:
    a capped kernel level gets an inductor cache directory of its own; a user's own choice and
    the uncapped default stay as they are."""
    from lmforge.hardware import isolate_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    assert isolate_compile_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    path = isolate_compile_cache()
    assert path is not None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == path
    assert "ATEN_CPU_CAPABILITY_avx2" in path and "ONEDNN_MAX_CPU_ISA_AVX2" in path
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert isolate_compile_cache() is None  # the variable is set now: the user's (or our) choice stays
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    other = isolate_compile_cache()
    assert other is not None and other != path
    # torch writes its default into the variable when it first looks: that is not a choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert isolate_compile_cache() == other
