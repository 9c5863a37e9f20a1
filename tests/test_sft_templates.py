"""Chat SFT over every chat template the project ships or imports: each assistant turn's
end-of-turn token carries loss (a model trained otherwise never learns to stop), no user or
system token does; `lmforge finetune --preview` shows it; a template that renders the marker
outside the assistant turn is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.encoding import tokenize_example
from lmforge.tokenizer.bpe import train_bpe
from lmforge.tokenizer.chat import CHATML, ChatTemplate
from lmforge.train.objectives.preview import assistant_turn_ends, end_of_turn_token_ids, preview

from conftest import SMOLLM2_TEMPLATE as SMOLLM2
from conftest import needs_smol, save_tiny_llama

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]"]
# Llama-3's: header tokens, <|eot_id|> ends every turn
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Mistral / Llama-2 style: no assistant header and no generation prompt at all; the reply
# follows [/INST] and ends with the end-of-sequence token
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# transformers' {% generation %} markers around the reply (return_assistant_tokens_mask)
GENERATION_MARKED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                     "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                     "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEMPLATES = {
    "chatml": (CHATML, {}),
    "smollm2": (SMOLLM2, {}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-no-generation-prompt": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
    "generation-markers": (GENERATION_MARKED, {}),
}
CONVERSATION = [
    {"role": "user", "content": "Are you a football fan?"},
    {"role": "assistant", "content": "Yes, I am. Do you watch the NFL?"},
    {"role": "user", "content": "Every Sunday. Did you know the visiting locker room in Iowa is pink?"},
    {"role": "assistant", "content": "I did not! That must annoy the visitors."},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for m in CONVERSATION] * 20
    return train_bpe(texts, vocab_size=400, special_tokens=SPECIALS, show_progress=False)


def check_turn_ends(messages, tok, template) -> None:
    ids, labels = tokenize_example({"messages": messages}, tok, template, assistant_only=True)
    ends = assistant_turn_ends(messages, tok, template)
    assert len(ends) == sum(m["role"] == "assistant" for m in messages)
    eot = end_of_turn_token_ids(tok)
    for index, inside in ends:
        assert index is not None and inside, ends
        assert ids[index] in eot and labels[index] != -100
    # no loss on user or system text: the first user turn's words are never labelled
    user_ids = tok.encode(messages[-2]["content"] if messages[-2]["role"] == "user" else messages[0]["content"])
    labelled = [t for t, lab in zip(ids, labels) if lab != -100]
    assert not any(labelled[i : i + len(user_ids)] == user_ids for i in range(len(labelled))), "user text carries loss"


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("system", [False, True])
def test_every_assistant_turn_end_carries_loss(tokenizer, name, system) -> None:
    source, specials = TEMPLATES[name]
    template = ChatTemplate(source, specials)
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + CONVERSATION
    check_turn_ends(messages, tokenizer, template)
    shown = preview([{"messages": messages}], tokenizer, template, assistant_only=True, max_length=512, n=1)
    assert "end of turn: 2 of 2 assistant turns end with a loss-carrying" in shown
    assert shown.split("\n", 1)[1].count("\u27e6") == 2  # two marked runs (below the header): the two replies


def test_a_template_that_ends_turns_outside_the_reply_is_caught(tokenizer) -> None:
    """The check can fail: this template closes each turn only when the next one opens, so an
    assistant turn's <|im_end|> lands in the next turn's (unlabelled) piece."""
    late = ("{% for m in messages %}{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}{% if messages %}{{ '<|im_end|>\\n' }}{% endif %}"
            "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    template = ChatTemplate(late, {})
    messages = [*CONVERSATION, {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye!"}]
    ends = assistant_turn_ends(messages, tokenizer, template)
    assert [inside for _, inside in ends[:2]] == [False, False]
    shown = preview([{"messages": messages}], tokenizer, template, assistant_only=True, max_length=512, n=1)
    assert "the model would not learn to stop" in shown


@needs_smol
def test_smollm2_imported_template_and_tokenizer(smol_ckpt) -> None:
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(smol_ckpt / "tokenizer.json")
    template = ChatTemplate.from_checkpoint(smol_ckpt)
    assert "SmolLM" in template.render(CONVERSATION[:1])  # its default system prompt: the template is the GGUF's
    check_turn_ends(CONVERSATION, tok, template)


def test_finetune_preview_prints_marked_examples_and_trains_nothing(tiny_data: Path, tmp_path: Path, capsys) -> None:


    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=256, init_std=0.05)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION[:2 + 2 * (i % 2)]}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    assert main(["finetune", f"base={base}", f"out_dir={out}", f"data.train=[{data}]", "data.val_fraction=0",
                 "--preview", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- example ") == 2 and "of 6:" in printed
    assert "\u27e6Yes, I am. Do you watch the NFL?<|im_end|>" in printed
    assert "end of turn: 1 of 1 assistant turns" in printed and "end of turn: 2 of 2 assistant turns" in printed
    assert not out.exists()  # nothing trained, nothing written
    assert main(["finetune", f"base={base}", f"data.train=[{data}]", "objective=classify", "--preview", "1"]) == 2
    assert "--preview shows chat SFT examples" in capsys.readouterr().err
