"""One local lm-evaluation-harness task scored two ways on the same checkpoint: through the
in-process bridge (``--model lmforge``, lmforge.eval.harness) and through ``lmforge serve`` +
lm-eval's ``local-completions`` model (``/v1/completions`` with echo + logprobs). Both must
give the same accuracy and the same per-choice log-likelihoods.

The task is next-utterance selection on the embedded SGD dialogues
(data/finetune/sgd_next_utterance_test.jsonl: a conversation, four candidate assistant replies),
written as an lm-eval ``multiple_choice`` YAML over the local JSONL (offline).

    python benchmarks/harness_agreement.py --checkpoint runs/smollm2-135m [--limit 100]

Writes benchmarks/results/harness_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "finetune" / "sgd_next_utterance_test.jsonl"
TASK = "sgd_next_utterance"

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{% for m in messages %}}{{{{ m.role }}}}: {{{{ m.content }}}}\\n{{% endfor %}}assistant:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def run(model, manager, limit, model_args=None):
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=manager,
                                  log_samples=True, num_fewshot=0, limit=limit)
    seconds = time.perf_counter() - start
    res = out["results"][TASK]
    lls = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in out["samples"][TASK]}
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "seconds": round(seconds, 1)}, lls


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N documents (default all 100)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "harness_agreement.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import LmforgeLM
    from lmforge.serve.app import ServeConfig, ServedModel, create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.tokenizer.chat import ChatTemplate

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=DATA), encoding="utf-8")
        manager = TaskManager(include_path=str(tmp), include_defaults=False)

        lm = LmforgeLM(pretrained=a.checkpoint, batch_size=a.batch_size)
        bridge, bridge_lls = run(lm, manager, a.limit)
        print("bridge:", bridge)

        # the server, and a Hugging Face tokenizer directory for lm-eval (the same tokenizer.json)
        tok_dir = tmp / "hf-tokenizer"
        tok_dir.mkdir()
        shutil.copy(Path(lm.checkpoint) / "tokenizer.json", tok_dir / "tokenizer.json")
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        app = create_app([ServedModel("lmforge", lm.engine, ChatTemplate.from_checkpoint(lm.checkpoint))],
                         ServeConfig())
        with BackgroundServer(app) as srv:
            served, served_lls = run(
                "local-completions", manager, a.limit,
                {"model": "lmforge", "base_url": srv.url + "/v1/completions", "tokenizer": str(tok_dir),
                 "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "timeout": 600},
            )
        print("serve + local-completions:", served)

    diffs = [abs(x - y) for d in bridge_lls for x, y in zip(bridge_lls[d], served_lls[d], strict=True)]
    result = {
        "checkpoint": str(a.checkpoint),
        "task": f"{TASK} ({DATA.relative_to(ROOT)}, {len(bridge_lls)} documents, 4 choices, 0-shot)",
        "bridge": bridge,
        "serve_local_completions": served,
        "choices_scored": len(diffs),
        "max_abs_loglik_diff": max(diffs),
        "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "threads": a.threads,
        "note": "seconds measured on a shared 2-core machine with other jobs running: not a speed comparison",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
