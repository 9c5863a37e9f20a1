"""`lmforge finetune` on tiny models: SFT loss masking, SFT/classification/DPO runs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, save_tiny_llama

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.encoding import tokenize_example
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import ChatTemplate
from lmforge.checkpoint import load_model
from lmforge.train.finetune import FinetuneConfig, run_finetune

QUIET = ["log.console=false", "log.tensorboard=false", "train.threads=1", "train.device=cpu", "train.precision=fp32"]


@pytest.fixture(scope="module")
def base(tiny_data: Path, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_data, tmp_path_factory.mktemp("ft") / "base", context_length=128, init_std=0.05)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversations(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["hello", "what time", "book it", "thanks", "where to", "how many"]
    out = []
    for _ in range(n):
        q = words[int(torch.randint(0, len(words), (1,), generator=g))]
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"sure, {q}. done."}]})
    return out


def _run(base: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(FinetuneConfig, "finetune", None, [f"base={base}", f"out_dir={out}", *QUIET, *overrides])
    return run_finetune(cfg)


def test_sft_loss_falls_on_assistant_characters_only(tiny_data):
    tok = Tokenizer.from_file(tiny_data / "tokenizer.json")  # char-level: one token per character
    # plain characters the Shakespeare char vocabulary knows, so text and tokens align one to one
    template = ChatTemplate(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ex = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                       {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now"},
                       {"role": "assistant", "content": "goodbye"}]}
    ids, labels = tokenize_example(ex, tok, template, assistant_only=True)
    text = template.render(ex["messages"], add_generation_prompt=False)
    assert len(ids) == len(text)
    kept = "".join(ch for ch, lab in zip(text, labels) if lab != -100)
    assert kept == "hello\ngoodbye\n"
    _, all_labels = tokenize_example(ex, tok, template, assistant_only=False)
    assert all(lab != -100 for lab in all_labels)
    ids, labels = tokenize_example({"prompt": "to be", "completion": " or not"}, tok, template, assistant_only=True)
    assert [i for i, lab in zip(ids, labels) if lab != -100] == tok.encode(" or not") + [tok.eot_id]


def test_sft_lora_run_lowers_held_out_loss_and_saves_an_adapter(base, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _conversations(64, 0))
    val = _write_jsonl(tmp_path / "val.jsonl", _conversations(16, 1))
    out = tmp_path / "run"
    s = _run(base, out, f"data.train=[{data}]", f"data.val=[{val}]", "peft.method=lora", "peft.r=4",
             "peft.target_modules=[all-linear]", "train.max_steps=40", "train.lr=1e-2", "train.eval_interval=0",
             "train.micro_batch_size=8", "peft.dropout=0")
    assert s["after"]["val_loss"] < 0.85 * s["before"]["val_loss"]
    assert 0 < s["trainable_percent"] < 50 and s["tokens_per_s"] > 0 and s["peak_rss_mib"] > 0
    ckpt = Path(s["checkpoint"])
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "adapter_config.json").is_file()  # a Llama-family LoRA: PEFT's format
    assert (out / "plots" / "loss.png").stat().st_size > 0 and s["report"] == str(out / "report.md")
    model, _ = load_model(out)  # base + adapter
    assert model.peft is not None
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    x = torch.randint(0, merged.config.vocab_size, (2, 20))
    model.eval(), merged.eval()
    assert torch.allclose(model(x), merged(x), atol=1e-5)


def test_classification_run_reports_metrics_and_confusion_matrix(base, tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(120):
        label = ["north", "south", "east"][i % 3]
        letter = label[0]
        n = int(torch.randint(3, 9, (1,), generator=g))
        rows.append({"text": f"{letter * n} road", "label": label})
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:90])
    val = _write_jsonl(tmp_path / "val.jsonl", rows[90:])
    out = tmp_path / "cls"
    s = _run(base, out, "objective=classify", f"data.train=[{train}]", f"data.val=[{val}]", "train.max_steps=40",
             "train.lr=5e-3", "train.micro_batch_size=16", "train.eval_interval=0", "classify.class_weights=balanced")
    assert s["method"] == "full"
    assert s["classification"]["accuracy"] == 1.0 and s["classification"]["macro_f1"] == 1.0
    assert (out / "confusion_matrix.png").stat().st_size > 0
    report = json.loads((out / "classification.json").read_text())
    assert sum(map(sum, report["confusion"])) == 30
    cfg = json.loads((Path(s["checkpoint"]) / "config.json").read_text())
    assert cfg["model"]["num_labels"] == 3 and cfg["labels"] == ["east", "north", "south"]


def test_dpo_raises_held_out_preference_accuracy_above_the_reference(base, tmp_path):
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        out = []
        for _ in range(n):
            a, b = (int(x) for x in torch.randint(2, 7, (2,), generator=g))
            out.append({"prompt": "answer:", "chosen": "yes " * a, "rejected": "no " * b})
        return out

    train = _write_jsonl(tmp_path / "train.jsonl", pairs(64))
    val = _write_jsonl(tmp_path / "val.jsonl", pairs(24))
    for method in ("lora", "none"):
        s = _run(base, tmp_path / f"dpo-{method}", "objective=dpo", f"data.train=[{train}]", f"data.val=[{val}]",
                 f"peft.method={method}", "peft.r=4", "peft.target_modules=[all-linear]", "train.max_steps=25",
                 "train.lr=5e-3", "train.micro_batch_size=8", "train.eval_interval=0", "dpo.beta=0.5")
        after = s["after"]
        assert after["val_pref_acc"] > after["ref_pref_acc"], (method, after)
        assert after["val_reward_acc"] > 0.9 and after["val_loss"] < s["before"]["val_loss"]
        assert s["before"]["val_reward_acc"] == 0.0  # policy == reference at the start: no margin


def test_bad_input_is_counted_and_reported(base, tmp_path, capsys):
    good = _conversations(8, 0)
    rows = [*good, {"messages": [{"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "not an object"]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n")
    s = _run(base, tmp_path / "mixed", f"data.train=[{data}]", "train.max_steps=2", "data.val_fraction=0.25")
    rep = s["data"]["train"]
    assert rep["seen"] == 12 and rep["kept"] == 8 and sum(rep["rejected"].values()) == 4
    printed = capsys.readouterr().out
    assert "mixed.jsonl:9" in printed and "mixed.jsonl:10" in printed  # record numbers of the bad ones

    labelled = _write_jsonl(tmp_path / "lab.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}] * 4)
    s = _run(base, tmp_path / "lab", "objective=classify", f"data.train=[{labelled}]", "data.labels=[x,y]",
             "train.max_steps=2", "data.val_fraction=0.25")
    assert s["data"]["train"]["rejected"] == {"unknown_label": 4}

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}] * 3)
    assert main(["finetune", f"base={base}", f"out_dir={tmp_path / 'bad'}", f"data.train=[{bad}]", *QUIET]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["finetune", f"base={base}", f"out_dir={tmp_path / 'r0'}", f"data.train=[{bad}]", "peft.method=lora", "peft.r=0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["finetune", f"base={tmp_path / 'nowhere'}", f"data.train=[{bad}]"]) == 2
    assert "not found" in capsys.readouterr().err


def test_lora_finetune_resumes_exactly_from_an_adapter_checkpoint(base, tmp_path):
    """A LoRA SFT run resumed from its step-3 adapter checkpoint retraces steps 4-6."""
    import shutil

    from safetensors.torch import load_file

    from lmforge.checkpoint import resolve_checkpoint

    data = _write_jsonl(tmp_path / "train.jsonl", _conversations(48, 0))
    common = [f"data.train=[{data}]", "peft.method=lora", "peft.r=4", "peft.target_modules=[all-linear]",
              "train.max_steps=6", "train.lr=1e-2", "train.micro_batch_size=4", "train.log_interval=1",
              "train.deterministic=true", "data.val_fraction=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(base, straight, *common, "train.ckpt_interval=3", "train.keep_checkpoints=3")
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints/step_0000003", resumed / "checkpoints/step_0000003")
    cfg = load_config(FinetuneConfig, "finetune", None, [f"base={base}", f"out_dir={resumed}", *QUIET, *common])
    run_finetune(cfg, resume=True)
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert {r["step"]: r["loss"] for r in read_metrics(resumed)} == {s: expected[s] for s in (4, 5, 6)}
    a = load_file(str(resolve_checkpoint(straight) / "adapter_model.safetensors"))
    b = load_file(str(resolve_checkpoint(resumed) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_before_training_shows_progress_and_counts_in_the_time_budget(base, tmp_path, capfd):
    """The held-out evaluation before fine-tuning showed no progress (tens of seconds on SmolLM2);
    with train.max_minutes its time is the budget's measured evaluation cost (no second one to plan)."""
    from lmforge.train import engine as engine_mod

    data = _write_jsonl(tmp_path / "train.jsonl", _conversations(32, 0))
    val = _write_jsonl(tmp_path / "val.jsonl", _conversations(24, 1))
    calls = []
    real = engine_mod.Engine.evaluate
    engine_mod.Engine.evaluate = lambda self: calls.append(self.step) or real(self)
    try:
        summary = _run(base, tmp_path / "run", f"data.train=[{data}]", f"data.val=[{val}]", "sft.eval_batch_size=2",
                       "train.max_steps=40", "train.max_minutes=1", "train.eval_interval=0", "log.console=true")
    finally:
        engine_mod.Engine.evaluate = real
    assert "eval:" in capfd.readouterr().err  # the bar of the evaluation before training
    assert calls == [0, 40] and summary["before"] and summary["after"]  # before training and at the end only
