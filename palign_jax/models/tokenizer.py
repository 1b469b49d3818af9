"""Tokenizers: from a local Hugging Face folder, or rebuilt from a GGUF file's metadata.

A Hugging Face folder carries its own `tokenizer.json`; `AutoTokenizer` reads it. A GGUF
file carries the vocabulary, merges, token types, special token ids and chat template as
`tokenizer.*` metadata; transformers' own GGUF path imports torch, so
`tokenizer_from_gguf` builds the same byte-level BPE with the `tokenizers` library and
wraps it in a `PreTrainedTokenizerFast`. It follows the file's own metadata for special
tokens (for SmolLM2: eos = `<|im_end|>`, no BOS added) and splits text the way llama.cpp
does for the file's `tokenizer.ggml.pre` type. Gemma files carry a SentencePiece vocabulary
(`tokenizer.ggml.model` "llama", no merges): it is built by transformers' own GGUF converter
for Gemma (`gemma_tokenizer`: merges recovered from the vocabulary's order, byte fallback).

Gemma 3 gets `GEMMA3_CHAT_TEMPLATE` (`use_gemma3_chat_template`): it renders every
conversation exactly like Google's template, and also renders a system turn alone as the
start of that conversation, which prefix-shared scoring needs (Google's renders it as just
`<bos>`: Gemma has no system turn; the system text opens the first user turn). A GGUF file
without a template (the 270M base model) is given the same one.

`chat_prompt` renders a chat with the tokenizer's template and raises `UserInputError`
naming the tokenizer's file when there is none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from palign_jax.errors import UserInputError
from palign_jax.models.gguf import metadata_value, open_gguf

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp `tokenizer.ggml.pre` (src/llama-vocab.cpp) -> how text is split before BPE.
# "digits+gpt2": every numeric character on its own, then the GPT-2 split, which is the
# `Sequence[Digits(individual_digits), ByteLevel]` of the original SmolLM2 tokenizer.json.
PRE_TOKENIZER_KINDS = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), "digits+gpt2"),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (gguf.TokenType)
_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def pre_tokenizer_for(pre: str | None, source: str = "gguf") -> pre_tokenizers.PreTokenizer:
  """The `tokenizers` pre-tokenizer for a llama.cpp `tokenizer.ggml.pre` name."""
  kind = PRE_TOKENIZER_KINDS.get(pre or "gpt-2")
  if kind is None:
    raise UserInputError(
        f"{source}: metadata 'tokenizer.ggml.pre' is {pre!r}; supported: "
        f"{sorted(PRE_TOKENIZER_KINDS)}")
  gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind == "gpt2":
    return gpt2
  if kind == "digits+gpt2":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(kind), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(path: str | os.PathLike | gguf.GGUFReader
                        ) -> transformers.PreTrainedTokenizerFast:
  """Builds the byte-level BPE tokenizer a GGUF file describes, with its chat template."""
  if isinstance(path, gguf.GGUFReader):
    reader, source = path, str(getattr(path.data, "filename", None) or "gguf")
  else:
    reader, source = open_gguf(path), str(path)
  get = lambda key, default=...: metadata_value(reader, key, default, source=source)

  kind = get("tokenizer.ggml.model", None)
  architecture = get("general.architecture", None)
  if kind == "llama" and architecture == "gemma3":
    return _gemma_tokenizer(reader, source)
  if kind != "gpt2":
    raise UserInputError(
        f"{source}: metadata 'tokenizer.ggml.model' is {kind!r}; only byte-level BPE "
        "('gpt2') tokenizers, and Gemma 3's SentencePiece one, can be built from a GGUF file; "
        "load the Hugging Face folder instead")
  tokens = get("tokenizer.ggml.tokens")
  merges = []
  for merge in get("tokenizer.ggml.merges"):
    pair = merge.split(" ")
    if len(pair) != 2:
      raise UserInputError(f"{source}: metadata 'tokenizer.ggml.merges' has a bad entry {merge!r}")
    merges.append(tuple(pair))
  token_types = get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
  if len(token_types) != len(tokens):
    raise UserInputError(
        f"{source}: metadata 'tokenizer.ggml.token_type' has {len(token_types)} entries for "
        f"{len(tokens)} tokens")

  try:
    backend = Tokenizer(models.BPE(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
        fuse_unk=False, byte_fallback=False))
  except Exception as err:  # tokenizers raises a bare Exception for inconsistent merges
    raise UserInputError(
        f"{source}: metadata 'tokenizer.ggml.merges' does not fit 'tokenizer.ggml.tokens': "
        f"{err}") from None
  backend.pre_tokenizer = pre_tokenizer_for(get("tokenizer.ggml.pre", None), source)
  backend.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) are matched whole and are special (skipped on decode);
  # user-defined ones are matched whole but kept in decoded text, as in llama.cpp.
  backend.add_special_tokens([
      AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL])
  backend.add_tokens([
      AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED])

  return _wrap(backend, reader, tokens, source)


def _wrap(backend: Tokenizer, reader: gguf.GGUFReader, tokens: list[str], source: str,
          chat_template: str | None = None) -> transformers.PreTrainedTokenizerFast:
  """`backend` with the file's special tokens, BOS/EOS flags and chat template."""
  get = lambda key, default=...: metadata_value(reader, key, default, source=source)
  special = {}
  for name, key in _SPECIAL_TOKEN_IDS.items():
    token_id = get(key, None)
    if token_id is None:
      continue
    if not 0 <= token_id < len(tokens):
      raise UserInputError(
          f"{source}: metadata '{key}' is {token_id}, outside the vocabulary of {len(tokens)}")
    special[name] = tokens[token_id]
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      name_or_path=source,
      chat_template=get("tokenizer.chat_template", None) or chat_template,
      # Passed explicitly so transformers builds the post-processor from the file's flags.
      add_bos_token=bool(get("tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(get("tokenizer.ggml.add_eos_token", False)),
      clean_up_tokenization_spaces=False,
      **special)


def _gemma_tokenizer(reader: gguf.GGUFReader, source: str) -> transformers.PreTrainedTokenizerFast:
  """Gemma's SentencePiece tokenizer, built by transformers' GGUF converter for Gemma (it
  recovers the merges from the vocabulary's order and respells whitespace tokens); control
  tokens (`<start_of_turn>`, ...) are matched whole and special."""
  from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_gguf

  get = lambda key, default=...: metadata_value(reader, key, default, source=source)
  tokens = get("tokenizer.ggml.tokens")
  token_types = get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
  if len(token_types) != len(tokens):
    raise UserInputError(
        f"{source}: metadata 'tokenizer.ggml.token_type' has {len(token_types)} entries for "
        f"{len(tokens)} tokens")
  described = {"tokenizer_type": "llama", "tokens": tokens, "token_type": token_types}
  built = hf_gguf.add_gguf_special_tokens(hf_gguf.gemma_tokenizer(described), described)
  return _wrap(built.backend_tokenizer, reader, tokens, source, GEMMA3_CHAT_TEMPLATE)


# Google's Gemma 3 template (text turns), except that a system turn alone renders as the start
# of the first user turn it opens, so the system prompt is a reusable prefix.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['role'] == 'system' -%}"
    "{%- if system -%}{{ '<start_of_turn>user\n' + messages[0]['content'] + '\n\n' }}"
    "{%- endif -%}"
    "{%- for message in (messages[1:] if system else messages) -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if not (system and loop.first) -%}{{ '<start_of_turn>' + role + '\n' }}{%- endif -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def use_gemma3_chat_template(tokenizer: transformers.PreTrainedTokenizerBase
                             ) -> transformers.PreTrainedTokenizerBase:
  """Sets `GEMMA3_CHAT_TEMPLATE` on a Gemma 3 tokenizer (whatever template it had)."""
  tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
  return tokenizer


def tokenizer_from_folder(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer of a local Hugging Face folder (never downloads)."""
  path = Path(path)
  if not path.is_dir():
    raise UserInputError(f"{path}: tokenizer folder not found")
  if not any((path / name).is_file() for name in TOKENIZER_FILES):
    raise UserInputError(
        f"{path}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})")
  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, KeyError) as err:
    raise UserInputError(f"{path}: cannot load a tokenizer from this folder: {err}") from None


def chat_prompt(tokenizer: transformers.PreTrainedTokenizerBase,
                messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = True) -> str:
  """Renders `messages` ([{"role", "content"}, ...]) with the tokenizer's chat template."""
  if not getattr(tokenizer, "chat_template", None):
    raise UserInputError(
        f"{tokenizer.name_or_path or 'tokenizer'}: the tokenizer has no chat template "
        "('chat_template' in tokenizer_config.json, or 'tokenizer.chat_template' in a GGUF "
        "file), so it cannot format a chat prompt")
  return tokenizer.apply_chat_template(
      list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
