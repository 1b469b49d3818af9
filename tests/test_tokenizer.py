"""Tokenizers rebuilt from GGUF metadata, checked token for token against transformers."""

import json

import numpy as np
import pytest
import regex
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from palign_jax.errors import UserInputError
from palign_jax.models import gguf as gguf_loader
from palign_jax.models.config import ModelConfig
from palign_jax.models.params import expected_hf_shapes
from palign_jax.models.tokenizer import (
    chat_prompt,
    pre_tokenizer_for,
    tokenizer_from_folder,
    tokenizer_from_gguf,
)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sure they'll've seen it.",
    "Numbers: 3.14159, 1,000,000 and 2024-11-28; x² and 1/2 too.",
    "  Indented\tlines\n\nand    runs of spaces   ",
    "Unicode: café naïve 日本語 한국어 Ελληνικά 🤖👍🏽",
    "def f(x):\n    return x ** 2  # comment",
] * 20
TEXTS = [
    "Hello, world! The lazy dog jumps.",
    "  leading spaces\tand tabs\n\nnewlines   trailing  ",
    "numbers 12345 and 3.14159, 1,000,000 and 2024",
    "unicode: café naïve 日本語 한국어 emoji 🤖👍🏽 Ελληνικά",
    "I'm sure they'll've DONE it, haven't they?",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a <think> tag", "", " ", "\n",
]


def tiny_vocab(pre_tokenizer):
  """A byte-level BPE vocabulary trained here, as GGUF token list, types and merges."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=420, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model = json.loads(tok.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  types = [3 if t in SPECIALS else 4 if t == "<think>" else 1 for t in tokens]
  return tokens, types, merges


def write_tokenizer_gguf(path, pre="smollm", chat_template=CHATML, **overrides):
  digits = pre in ("smollm",)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokens, types, merges = tiny_vocab(
      pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
      if digits else byte_level)
  config = ModelConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                       tie_word_embeddings=True)
  tensors = {name: np.zeros(shape, np.float32)
             for name, shape in expected_hf_shapes(config).items()}
  metadata = {
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
      "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
      "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
      "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
      "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
      **({"tokenizer.chat_template": chat_template} if chat_template else {}),
      **overrides,
  }
  gguf_loader.write_gguf(path, config, tensors, metadata=metadata)
  return path


def assert_same_tokens(ours, theirs, texts):
  for text in texts:
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], repr(text)
    ids = ours(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids), repr(text)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
        ids, skip_special_tokens=True), repr(text)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_tiny_gguf_tokenizer_matches_transformers(tmp_path, pre):
  path = write_tokenizer_gguf(tmp_path / "tok.gguf", pre)
  ours = tokenizer_from_gguf(path)
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
  messages = [{"role": "user", "content": "How are you? 42"}]
  prompt = chat_prompt(ours, messages)
  assert prompt == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
  assert prompt.endswith("<|im_start|>assistant\n")
  assert_same_tokens(ours, theirs, TEXTS + [prompt])
  assert ours("<|im_start|>")["input_ids"] == [1]
  assert "<think>" in ours.convert_ids_to_tokens(ours("a <think> tag")["input_ids"])


def test_special_tokens_follow_the_file(tmp_path):
  ours = tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "a.gguf"))
  assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
  assert (ours.bos_token, ours.pad_token, ours.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>")
  assert ours("hi")["input_ids"][0] != ours.bos_token_id  # add_bos_token = false
  with_bos = tokenizer_from_gguf(write_tokenizer_gguf(
      tmp_path / "b.gguf", **{"tokenizer.ggml.add_bos_token": True}))
  assert with_bos("hi")["input_ids"] == [1] + ours("hi")["input_ids"]


def llama_cpp_split(text, expressions):
  """llama.cpp's unicode_regex_split: each regex splits every piece; unmatched text stays."""
  pieces = [text]
  for expression in expressions:
    split = []
    for piece in pieces:
      end = 0
      for match in regex.finditer(expression, piece):
        if match.start() > end:
          split.append(piece[end:match.start()])
        if match.end() > match.start():
          split.append(match.group())
        end = match.end()
      if end < len(piece):
        split.append(piece[end:])
    pieces = split
  return pieces


GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre, expressions", [
    ("smollm", [r"\p{N}", GPT2]), ("gpt-2", [GPT2]), ("llama-bpe", [LLAMA3])])
def test_pre_tokenizer_splits_like_llama_cpp(pre, expressions):
  pre_tokenizer = pre_tokenizer_for(pre)
  for text in TEXTS + ["x² ½ ٣٤ 1234567", "It'S DONE'll\r\n\r\n  x", "a\n\n\n b   \n"]:
    ours = [text[start:end] for _, (start, end) in pre_tokenizer.pre_tokenize_str(text)]
    assert ours == llama_cpp_split(text, expressions), repr(text)


def test_chat_prompt_without_template_names_the_file(tmp_path):
  ours = tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "plain.gguf", chat_template=None))
  assert ours("hello")["input_ids"]  # plain tokenization still works
  with pytest.raises(UserInputError, match=r"plain\.gguf: the tokenizer has no chat template"):
    chat_prompt(ours, [{"role": "user", "content": "hi"}])


def test_folder_tokenizer_and_missing_template(tmp_path):
  path = write_tokenizer_gguf(tmp_path / "tok.gguf", chat_template=None)
  tokenizer_from_gguf(path).save_pretrained(tmp_path / "folder")
  loaded = tokenizer_from_folder(tmp_path / "folder")
  assert loaded("hello 12")["input_ids"] == tokenizer_from_gguf(path)("hello 12")["input_ids"]
  with pytest.raises(UserInputError, match=r"folder: the tokenizer has no chat template"):
    chat_prompt(loaded, [{"role": "user", "content": "hi"}])
  with pytest.raises(UserInputError, match=r"nowhere: tokenizer folder not found"):
    tokenizer_from_folder(tmp_path / "nowhere")


def test_unsupported_tokenizers_are_user_errors(tmp_path):
  path = write_tokenizer_gguf(tmp_path / "spm.gguf", **{"tokenizer.ggml.model": "llama"})
  with pytest.raises(UserInputError, match=r"spm\.gguf: metadata 'tokenizer.ggml.model' is "
                     "'llama'"):
    tokenizer_from_gguf(path)
  path = write_tokenizer_gguf(tmp_path / "pre.gguf", **{"tokenizer.ggml.pre": "martian"})
  with pytest.raises(UserInputError, match=r"pre\.gguf: metadata 'tokenizer.ggml.pre' is "
                     "'martian'"):
    tokenizer_from_gguf(path)
  path = write_tokenizer_gguf(tmp_path / "merge.gguf", **{"tokenizer.ggml.merges": ["Ġ zzz"]})
  with pytest.raises(UserInputError, match=r"merge\.gguf: metadata 'tokenizer.ggml.merges' "
                     "does not fit"):
    tokenizer_from_gguf(path)
  path = write_tokenizer_gguf(tmp_path / "eos.gguf", **{"tokenizer.ggml.eos_token_id": 10**6})
  with pytest.raises(UserInputError, match=r"eos\.gguf: metadata 'tokenizer.ggml.eos_token_id'"):
    tokenizer_from_gguf(path)


@pytest.mark.slow
def test_real_smollm2_tokenizer_matches_transformers():
  path = gguf_loader.default_gguf_path()
  ours = tokenizer_from_gguf(path)
  theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
  assert ours.bos_token_id == 1 and ours("hi")["input_ids"] == [6004]  # no BOS added
  assert len(ours) == len(theirs) == 49152
  messages = [
      {"role": "system", "content": "You are a person taking a personality test."},
      {"role": "user", "content": "Statement: I am the life of the party.\nAnswer 1-5:"}]
  prompt = chat_prompt(ours, messages)
  assert prompt == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
  default_system = chat_prompt(ours, messages[1:])
  assert default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant")
  assert_same_tokens(ours, theirs, TEXTS + [prompt, default_system, "\n".join(CORPUS[:5])])

  # transformers' GGUF conversion does not isolate digits (tokenizer.ggml.pre = 'smollm');
  # it only shows on a space before a non-ASCII numeral. There we follow llama.cpp (and
  # the original SmolLM2 tokenizer.json): transformers' BPE on llama.cpp's pieces.
  for text in ["x ½ and ٣٤ or ² 1", "  ⅔⅔ cups"]:
    pieces = llama_cpp_split(text, [r"\p{N}", GPT2])
    expected = [i for piece in pieces for i in theirs(piece)["input_ids"]]
    assert ours(text)["input_ids"] == expected, repr(text)
