"""`lmforge eval`: sliding-window perplexity (against transformers), multiple-choice scoring
(against a hand computation), few-shot determinism, every task kind end to end, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_llama

from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.eval.choice import (
    build_choice_prompts,
    choice_metrics,
    draw_shots,
    multiple_choice_scores,
)
from lmforge.eval.perplexity import (
    sliding_window_nll,
    text_perplexity,
    window_plan,
)
from lmforge.runs.metrics import token_byte_lengths
from lmforge.tokenizer import Tokenizer
from lmforge.checkpoint import load_model


@pytest.fixture(scope="module")
def llama(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny_llama(tiny_data, tmp_path_factory.mktemp("llama") / "m", context_length=128, init_std=0.1)
    model, ckpt = load_model(path)
    return model.eval(), Tokenizer.from_file(ckpt / "tokenizer.json"), ckpt


TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


# ----------------------------------------------------------------------------- perplexity
def test_window_plan_scores_every_token_once() -> None:
    for n, L, s in [(10, 4, 2), (11, 4, 4), (5, 8, 3), (100, 16, 5), (2, 2, 1)]:
        plan = window_plan(n, L, s)
        scored = []
        for b, e, k in plan:
            assert e - b <= L and k <= e - b - (1 if b == 0 else 0)
            scored += list(range(e - k, e))
        assert scored == list(range(1, n)), (n, L, s)
        assert plan[-1][1] == n
    with pytest.raises(ConfigError, match="stride"):
        window_plan(10, 4, 5)
    with pytest.raises(ConfigError, match="at least 2"):
        window_plan(10, 1, 1)
    with pytest.raises(DataError, match="at least 2 tokens"):
        window_plan(1, 4, 2)


def test_sliding_window_equals_direct_windows(llama) -> None:
    model, tok, _ = llama
    ids = tok.encode(TEXT)
    out = sliding_window_nll(model, ids, max_length=32, stride=12, batch_size=3, progress=False)
    # by hand: one full forward per window, the scored tokens' losses summed
    total, count, prev = 0.0, 0, 0
    for begin in range(0, len(ids), 12):
        end = min(begin + 32, len(ids))
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logits = model(x[:, :-1])
        nll = F.cross_entropy(logits[0].float(), x[0, 1:], reduction="none").double()
        k = end - prev - (1 if begin == 0 else 0)
        total += float(nll[-k:].sum())
        count += k
        prev = end
        if end == len(ids):
            break
    assert out["tokens"] == count == len(ids) - 1
    assert out["nll"] == pytest.approx(total, rel=1e-6)
    # bf16 autocast stays close
    bf = sliding_window_nll(model, ids, max_length=32, stride=12, precision="bf16", progress=False)
    assert bf["nll"] == pytest.approx(total, rel=2e-2)
    # one window over the whole text is the plain mean loss
    ids = ids[:100]
    whole = sliding_window_nll(model, ids, max_length=len(ids), stride=len(ids), progress=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = model(x[:, :-1], x[:, 1:])
    assert whole["nll"] / whole["tokens"] == pytest.approx(float(loss), rel=1e-5)


def test_perplexity_equals_transformers(llama, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from lmforge.io.hf import export_hf

    model, tok, ckpt = llama
    export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    text = TEXT * 3
    ids = torch.tensor([tok.encode(text)])
    max_length, stride = 48, 20
    nll_sum, n_tokens, prev = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):  # the transformers perplexity guide's loop
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss.double().item()
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_tokens += scored
        prev = end
        if end == ids.size(1):
            break
    ours = text_perplexity(model, tok, text, max_length=max_length, stride=stride, progress=False)
    assert ours["tokens"] == n_tokens
    assert ours["perplexity"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)
    n_bytes = int(token_byte_lengths(tok)[ids[0, 1:].numpy()].sum())
    assert n_bytes == len(text.encode()) - len(text[0].encode())  # chars: every token but the first
    assert ours["bits_per_byte"] == pytest.approx(nll_sum / math.log(2) / n_bytes, rel=1e-5)


# ----------------------------------------------------------------------------- multiple choice
MC = [
    {"query": "Speak, speak.\nAll:", "choices": ["You are", "Before we", "resolved"], "answer": 0},
    {"query": "hear me", "choices": ["speak", "famish", "die"], "answer": 2},
    {"query": [{"role": "user", "content": "Who speaks?"}], "choices": ["All", "First Citizen"], "answer": 1},
]


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    x = torch.tensor([whole])
    with torch.no_grad():
        logits = model(x[:, :-1])
    logp = F.log_softmax(logits[0].double(), dim=-1)
    return float(sum(logp[p - 1, whole[p]] for p in range(len(ctx), len(whole))))


def test_multiple_choice_equals_hand_computed_loglikelihood(llama) -> None:
    model, tok, _ = llama
    scores, prompts = multiple_choice_scores(model, tok, MC, template="Q: {query}", progress=False)
    assert prompts[0] == "Q: Speak, speak.\nAll:" and prompts[2] == "User: Who speaks?\nAssistant:"
    for e, p, s in zip(MC, prompts, scores):
        want = [_loglik(model, tok, p, " " + c) for c in e["choices"]]
        np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-4)
    m = choice_metrics(MC, scores)
    acc = np.mean([int(np.argmax(s)) == e["answer"] for e, s in zip(MC, scores)])
    norm = np.mean([int(np.argmax(s / [len(c) for c in e["choices"]])) == e["answer"] for e, s in zip(MC, scores)])
    assert m["acc"] == pytest.approx(acc) and m["acc_norm"] == pytest.approx(norm)
    assert m["n"] == 3 and m["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)


def test_few_shot_prompts_are_seeded() -> None:
    pool = [{"query": f"q{i}", "choices": [f"a{i}", f"b{i}"], "answer": i % 2} for i in range(20)]
    a = draw_shots(pool, 4, seed=3, exclude=["q0"])
    assert a == draw_shots(pool, 4, seed=3, exclude=["q0"]) and "q0" not in [s["query"] for s in a]
    assert a != draw_shots(pool, 4, seed=4, exclude=["q0"])
    p1, c1 = build_choice_prompts(MC[:2], shots=a)
    p2, _ = build_choice_prompts(MC[:2], shots=draw_shots(pool, 4, seed=3, exclude=["q0"]))
    assert p1 == p2 and p1[0].startswith(f"{a[0]['query']} {a[0]['choices'][a[0]['answer']]}\n\n")
    assert c1[1] == [" speak", " famish", " die"]
    with pytest.raises(ConfigError, match="pool holds only 19"):
        draw_shots(pool, 25, seed=0, exclude=["q0"])


# ----------------------------------------------------------------------------- the command
def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def _tasks(root: Path) -> dict[str, Path]:
    """One tiny YAML task of every kind over files in ``root``."""
    cls = [{"text": t, "label": lab} for t, lab in [("speak speak", "talk"), ("die famish", "end"),
           ("hear me speak", "talk"), ("rather to die", "end"), ("proceed speak", "talk"), ("famish die", "end")]]
    _write(root / "cls_train.jsonl", cls)
    _write(root / "cls_test.jsonl", cls[:4])
    _write(root / "mc.jsonl", MC)
    _write(root / "mc_train.jsonl", [{"query": f"q{i}", "choices": ["speak", "die"], "answer": i % 2} for i in range(4)])
    _write(root / "gen.jsonl", [{"prompt": "First", "references": ["Citizen"]}, {"prompt": "All", "answer": "speak"}])
    conv = [{"messages": [{"role": "user", "content": "speak"}, {"role": "assistant", "content": "hear me"},
                          {"role": "user", "content": "die?"}, {"role": "assistant", "content": "famish"}]}]
    _write(root / "chat.jsonl", conv * 2)
    (root / "text.txt").write_text(TEXT)
    specs = {
        "cls": "kind: classify\ntrain: cls_train.jsonl\ntest: cls_test.jsonl\nlabels: [talk, end]\n"
               "template: 'Text: {text}\\nLabel:'\n",
        "mc": "kind: multiple_choice\ntrain: mc_train.jsonl\ntest: mc.jsonl\n",
        "gen": "kind: generate\ntest: gen.jsonl\nmax_tokens: 4\n",
        "chat": "kind: chat\ntest: chat.jsonl\nmax_tokens: 4\n",
        "ppl": "kind: perplexity\ntest: text.txt\nmax_length: 32\nstride: 16\n",
    }
    paths = {}
    for name, body in specs.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(body)
    return paths


def test_eval_command_every_kind(llama, tmp_path: Path, capsys) -> None:
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    _, _, ckpt = llama
    tasks = _tasks(tmp_path)
    out = tmp_path / "run"
    argv = ["eval", str(ckpt), "--task", ",".join(str(p) for p in tasks.values()), "--shots", "0,2",
            "--chat", "off", "--out", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    got = {(r["task"], r["method"]) for r in res["rows"]}
    assert got == {("cls", "0-shot"), ("cls", "2-shot"), ("mc", "0-shot"), ("mc", "2-shot"),
                   ("gen", "greedy"), ("chat", "greedy"), ("ppl", "window 32/16")}
    rows = {(r["task"], r["method"]): r for r in res["rows"]}
    assert rows[("cls", "0-shot")]["metrics"]["n"] == 4 and 0 <= rows[("cls", "2-shot")]["metrics"]["macro_f1"] <= 1
    assert rows[("mc", "0-shot")]["metrics"]["n"] == 3
    chat = rows[("chat", "greedy")]["metrics"]
    assert chat["conversations"] == 2 and chat["assistant_tokens"] > 0 and 0 <= chat["distinct_1"] <= 1
    assert math.isfinite(rows[("ppl", "window 32/16")]["metrics"]["bits_per_byte"])
    preds = [json.loads(x) for x in Path(rows[("cls", "2-shot")]["predictions"]).read_text().splitlines()]
    assert len(preds) == 4 and {"text", "label", "pred", "prompt"} <= set(preds[0])
    report = (out / "report.md").read_text()
    for png in ("cls/compare.png", "mc/compare.png"):
        assert (out / png).stat().st_size > 1000
    assert "confusion" in report and "| model | method |" in report
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / link).is_file(), link
    assert any(json.loads(x)["kind"].startswith("eval/") for x in (out / "metrics.jsonl").read_text().splitlines())
    # the same seed gives the same few-shot prompts
    again = tmp_path / "again"
    assert main([*argv[:-4], "--out", str(again), "--batch-size", "2"]) == 0
    first = [json.loads(x)["prompt"] for x in Path(rows[("cls", "2-shot")]["predictions"]).read_text().splitlines()]
    second_rows = {(r["task"], r["method"]): r for r in json.loads((again / "results.json").read_text())["rows"]}
    second = [json.loads(x)["prompt"] for x in Path(second_rows[("cls", "2-shot")]["predictions"]).read_text().splitlines()]
    assert first == second
    capsys.readouterr()


def test_eval_uses_a_classification_head(tiny_data: Path, tmp_path: Path) -> None:
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.checkpoint import save_checkpoint

    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, context_length=32, n_layer=1, n_head=2, n_embd=16))
    model.add_classification_head(2)
    ckpt = save_checkpoint(tmp_path / "clf", model, tiny_data / "tokenizer.json",
                           extra={"labels": ["talk", "end"], "classify_template": "{text}"})
    tasks = _tasks(tmp_path)
    assert main(["eval", str(ckpt), "--task", str(tasks["cls"]), "--shots", "0,5", "--out", str(tmp_path / "o")]) == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["head"]
    # the head's predictions, by hand
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    m, _ = load_model(ckpt)
    want = []
    for t in ["speak speak", "die famish", "hear me speak", "rather to die"]:
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            want.append(["talk", "end"][int(m(ids, lengths=torch.tensor([ids.size(1)])).argmax())])
    preds = [json.loads(x)["pred"] for x in Path(rows[0]["predictions"]).read_text().splitlines()]
    assert preds == want


def test_eval_bad_input(llama, tmp_path: Path, capsys) -> None:
    _, _, ckpt = llama
    tasks = _tasks(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.yaml").write_text("kind: multiple_choice\ntest: empty.jsonl\n")
    (tmp_path / "broken.jsonl").write_text('{"query": "x", "choices": ["a"], "answer": 0}\nnot json\n')
    (tmp_path / "broken.yaml").write_text("kind: multiple_choice\ntest: broken.jsonl\n")
    cases = [
        (["--task", "sgd-domian"], "unknown task 'sgd-domian' (did you mean 'sgd-domain'?)"),
        (["--task", str(tmp_path / "empty.yaml")], "only 0 of 0 records are usable choice examples"),
        (["--task", str(tmp_path / "broken.yaml")], "bad_choices: 1"),
        (["--task", str(tasks["cls"]), "--shots", "0,9"], "9 few-shot examples asked for, but the pool holds only 2"),
        (["--task", str(tasks["mc"]), "--shots", "5"], "5 few-shot examples asked for, but the pool holds only 4"),
        (["--task", str(tasks["cls"]), "--shots", "a"], "--shots takes numbers"),
        (["--task", str(tasks["ppl"]), "--stride", "64", "--max-length", "32"], "must not exceed the window length"),
        (["--task", str(tasks["cls"]), "--limit", "0"], "--limit must be at least 1"),
        ([], "name at least one task"),
        (["--text", str(tmp_path / "nope.txt")], "text file not found"),
    ]
    for extra, message in cases:
        assert main(["eval", str(ckpt), *extra, "--out", str(tmp_path / "o")]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert main(["eval", "--task", "sgd-domain"]) == 2
    assert "name a checkpoint" in capsys.readouterr().err


def test_multiple_choice_options_of_very_different_lengths(llama) -> None:
    """A batch mixing a long query with short options and a short query with long options: the
    cached scoring (rows that would overrun the context go one at a time) equals the plain one."""
    from lmforge.eval.prompting import prompt_scores

    model, tok, _ = llama
    long_text = ("speak " * 12).strip()
    examples = [
        {"query": long_text + " " + long_text[:40], "choices": ["die", "famish"], "answer": 0},
        {"query": "All:", "choices": [long_text, "Speak, speak."], "answer": 1},
    ]
    prompts, conts = build_choice_prompts(examples)
    assert len(tok.encode(prompts[0])) + len(tok.encode(conts[1][0])) > 128  # together they overrun
    cached = prompt_scores(model, tok, prompts, conts, batch_size=2)
    plain = prompt_scores(model, tok, prompts, conts, use_cache=False)
    np.testing.assert_allclose(cached, plain, rtol=1e-4, atol=1e-4)


def test_assistant_loss_equals_a_hand_computation(llama) -> None:
    """Chat eval's loss: the mean next-token loss over assistant tokens only (the SFT tokenization)."""
    from lmforge.data.encoding import tokenize_example
    from lmforge.eval.chat import assistant_loss
    from lmforge.tokenizer.chat import CHATML, ChatTemplate

    model, tok, _ = llama
    template = ChatTemplate(CHATML, {})
    convs = [{"messages": [{"role": "user", "content": "speak"}, {"role": "assistant", "content": "hear me"}]},
             {"messages": [{"role": "user", "content": "die?"}, {"role": "assistant", "content": "famish, rather"},
                           {"role": "user", "content": "All:"}, {"role": "assistant", "content": "Speak, speak."}]}]
    nll, n = 0.0, 0
    for conv in convs:
        ids, labels = tokenize_example(conv, tok, template, assistant_only=True)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        for p in range(len(ids) - 1):
            if labels[p + 1] != -100:
                nll -= float(logp[p, labels[p + 1]])
                n += 1
    got = assistant_loss(model, tok, template, convs, batch_size=2, progress=False)
    assert got["assistant_tokens"] == n and got["conversations"] == 2
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_chat_option_picks_the_template(llama) -> None:
    from lmforge.eval.run import EvalOptions, load_for_eval

    _, tok, ckpt = llama
    assert "<|im_start|>" in tok.special_tokens  # ChatML's tokens: auto takes the template
    assert load_for_eval(str(ckpt), EvalOptions(chat="auto")).chat_template is not None
    assert load_for_eval(str(ckpt), EvalOptions(chat="on")).chat_template is not None
    assert load_for_eval(str(ckpt), EvalOptions()).chat_template is None  # off by default, as lm-eval


def test_reply_metrics_count_identical_replies_and_turn_endings() -> None:
    """The quickstart's first chatbot answered three different requests with one question: the
    share of identical replies catches it; the share ending with the end-of-turn token catches
    a model that never stops (cut at max_tokens instead)."""
    from lmforge.eval.chat import identical_reply_share, reply_metrics

    def r(reply: str, finish: str = "stop") -> dict:
        return {"reply": reply, "reference": "a human reply", "reply_tokens": 5, "reference_tokens": 3,
                "finish_reason": finish}

    same = "What kind of food are you looking for?"
    m = reply_metrics([r(same), r(same.lower() + " "), r("Sure, at 7 pm."), r("Bye", "length")])
    assert m["identical_replies"] == 0.5 and m["ended_with_eot"] == 0.75 and m["cut_at_max_tokens"] == 0.25
    assert identical_reply_share(["a", "b", "c"]) == 0.0 and identical_reply_share(["x", "x"]) == 1.0
