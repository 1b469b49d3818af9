"""The reference's PAS alpha sweep, re-implemented in PyTorch + transformers: the timing baseline.

What it is: an independent re-implementation (no reference code copied) of how the PAS
reference implementation (PAlign, github.com/zhu-minjun/PAlign) answers the held-out PAPI
questions for one subject at each alpha, on the same model, weights, tokenizer and prompt strings
as palign-jax, so the two can be timed side by side. Per (alpha, batch of questions) it re-encodes
every whole prompt (the subject's ~1,400-token few-shot context + the question), steers the
attention heads' outputs before `o_proj` at every position, greedily generates new tokens with a
key/value cache, and parses the answer letter from the text.

Run (from the repository root; only the sweep is timed, model load is reported separately):

  PYTHONPATH=. .venv/bin/python benchmarks/reference_torch.py          # the fixed 30-item case
  PYTHONPATH=. .venv/bin/python benchmarks/reference_torch.py --items=9,10 --alphas=0,4 \
      --threads=2 --json=/tmp/reference_torch.json

What is mirrored, and from which file of the reference (commit 18e1e34):
  * `main.py`, `process_pas`: for each alpha, reset the steering, set the new one, and answer all
    held-out questions (`generateAnswer`); the model is never reloaded between alphas.
  * `main.py`, `generateAnswer`: batches of 10 questions in item order (3 only for 70B models),
    `max_new_tokens=15`, the answer text is everything the model generated after the prompt,
    decoded without skipping special tokens (`tokenizer.batch_decode(outputs)`, then split at the
    last header).
  * `PAlign/pas.py`, `PASLM.generate` (the custom loop `generateAnswer` calls): greedy (top-1);
    prompts right-padded with the eos id; no attention mask; the first forward encodes the
    first `min(prompt lengths)` tokens of every row, then ONE token per forward with the key/value
    cache, copying each row's own prompt tokens while they last and its argmax afterwards, until
    `max(prompt lengths) + max_new_tokens` (so shorter prompts of a batch get more than 15 new
    tokens), or earlier once every row has generated eos.
  * `PAlign/pas.py`, `PASLM.set_activate`: steering adds `alpha * sigma * direction` per head to
    the input of `o_proj`; the reference folds it into `o_proj.bias = W_o @ displacement`
    (identical maths), here a forward pre-hook on every layer's `self_attn.o_proj` adds the
    per-head vectors (flattened to hidden size, head-major as `(h d)`) at every position. As in
    the reference, which also sets a zero bias at alpha 0, the hook runs for every alpha.
  * `baseline_utils.py`, `process_answers`: the letter is the first match of
    `[abcdeABCDE][^a-zA-Z]` in the first 12 characters of the answer text, upper-cased;
    no match is "unparsable".
  * `PAlign/modeling_llama.py` (a copy of transformers ~4.43's Llama, attention "sdpa" by
    default): the same architecture as `transformers.LlamaForCausalLM` with sdpa attention.

Deliberate differences (each named so the comparison stays honest):
  * Prompt: our strings (`palign_jax.prompts`, the reference's wording) rendered by SmolLM2's chat
    template with the generation prompt, so the model starts with the answer. The reference's
    Llama-3 branch instead drops the last 5 tokens of a conversation ending in an assistant turn
    "Option", which leaves only `<|start_header_id|>`: the model spends ~3 of its 15 tokens
    regenerating the assistant header.
  * The rows still inside their prompt are told apart by their lengths. The reference uses
    `tokens != pad_id` with pad = eos, which also flags the prompt's own end-of-turn tokens
    (SmolLM2: `<|im_end|>` is eos) as "to generate" and overwrites them in the longer prompts of
    a batch; that changes answers, not cost.
  * float32 on CPU (the reference runs float16 on CUDA).
  * Prefill logits only for the last position by default (as `generate` in current transformers
    does); the reference's Llama copy computes them for every prompt position
    (`--all_logits` mirrors that; ~0.8 TFLOP and ~2.9 GB more per batch of 10 here).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import time
from collections.abc import Sequence

import numpy as np
import torch
import transformers

from palign_jax import data, prompts
from palign_jax.models import gguf as gguf_loader
from palign_jax.models import tokenizer as tk
from palign_jax.models.config import ModelConfig

# The fixed comparison case: 30 held-out IPIP-NEO item numbers (1..300).
DEFAULT_ITEMS = ("9,10,14,15,16,19,20,21,23,24,25,30,32,38,39,44,46,48,51,60,66,67,72,73,78,81,82,"
                 "83,87,92")
DEFAULT_ALPHAS = (0.0, 4.0)
# baseline_utils.process_answers: a letter followed by a non-letter, in the first 12 characters.
ANSWER_PATTERN = re.compile(r"[abcdeABCDE][^a-zA-Z]")
ANSWER_WINDOW = 12
UNPARSABLE = "unparsable"


# --- model ------------------------------------------------------------------------------------

def build_model(config: ModelConfig, tensors: dict[str, np.ndarray]
                ) -> transformers.LlamaForCausalLM:
  """A float32 `LlamaForCausalLM` holding exactly our loader's dequantized weights."""
  if config.architecture != "llama" or config.rope_scaling is not None or config.attention_bias:
    raise SystemExit(f"reference_torch: only plain Llama GGUFs are supported, got {config}")
  hf = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
      tie_word_embeddings=config.tie_word_embeddings,
      max_position_embeddings=config.max_position_embeddings)
  model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
  missing, unexpected = model.load_state_dict(
      {name: torch.from_numpy(value) for name, value in tensors.items()}, strict=False)
  allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
  if unexpected or set(missing) - allowed:
    raise SystemExit(f"reference_torch: weights do not fit: missing {missing}, "
                     f"unexpected {unexpected}")
  if config.tie_word_embeddings:  # lm_head shares embed_tokens' storage
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model.eval()


class OProjSteering:
  """Adds `delta[layer]` (hidden size = heads x head_dim, head-major) to every o_proj input."""

  def __init__(self, model: transformers.LlamaForCausalLM, config: ModelConfig):
    self.delta = torch.zeros(config.num_layers, config.num_heads * config.head_dim)
    self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i))
                    for i, layer in enumerate(model.model.layers)]

  def _hook(self, layer: int):
    def add(module: torch.nn.Module, args: tuple) -> tuple:
      return (args[0] + self.delta[layer],) + tuple(args[1:])
    return add

  def set(self, steering: np.ndarray) -> None:
    """steering: `[layers, heads, head_dim]`, already alpha * sigma * direction."""
    self.delta.copy_(torch.from_numpy(np.ascontiguousarray(steering, np.float32))
                     .reshape(self.delta.shape))


# --- the reference's generation loop ----------------------------------------------------------

@torch.inference_mode()
def reference_generate(model: transformers.LlamaForCausalLM, batch: Sequence[Sequence[int]],
                       max_new_tokens: int, eos_id: int, all_logits: bool = False
                       ) -> tuple[list[list[int]], int]:
  """Greedy decoding as `PASLM.generate` does it -> (new token ids per row, forward calls)."""
  lengths = torch.tensor([len(p) for p in batch])
  start, total = int(lengths.min()), int(lengths.max()) + max_new_tokens
  tokens = torch.full((len(batch), total), eos_id, dtype=torch.long)  # pad = eos, right-padded
  for row, prompt in enumerate(batch):
    tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
  in_prompt = torch.arange(total)[None, :] < lengths[:, None]
  eos_reached = torch.zeros(len(batch), dtype=torch.bool)
  cache, previous, end, calls = None, 0, total, 0
  for position in range(start, total):
    out = model(tokens[:, previous:position], cache=cache, use_cache=True,
                logits_to_keep=0 if (all_logits and cache is None) else 1)
    calls += 1
    cache, previous = out.cache, position
    next_token = out.logits[:, -1].argmax(-1)
    tokens[:, position] = torch.where(in_prompt[:, position], tokens[:, position], next_token)
    eos_reached |= ~in_prompt[:, position] & (next_token == eos_id)
    if bool(eos_reached.all()):
      end = position + 1
      break
  return [tokens[row, int(n):end].tolist() for row, n in enumerate(lengths)], calls


def parse_letter(text: str) -> str:
  """The answer letter as `process_answers` reads it, or "unparsable"."""
  match = ANSWER_PATTERN.search(text[:ANSWER_WINDOW])
  return match.group()[0].upper() if match else UNPARSABLE


# --- inputs -----------------------------------------------------------------------------------

def parse_numbers(text: str, kind: type, flag: str) -> list:
  try:
    values = [kind(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None
  if not values:
    raise SystemExit(f"{flag}: empty list")
  return values


def subject_prompts(tokenizer, subject: str, item_numbers: Sequence[int]) -> list[list[int]]:
  """Token ids of system (few-shot context) + user (question) + generation prompt, per item."""
  subjects = data.load_papi_subjects()
  if subject not in subjects.ids:
    raise SystemExit(f"--subject: {subject!r} is not a PAPI subject id (e.g. {subjects.ids[0]})")
  system = prompts.few_shot_system_prompt(data.known_answers(subjects.select([subject]))[0])
  texts = data.load_items().text
  return [prompts.encode_chat_prompt(tokenizer, system, prompts.question(texts[n - 1]))
          for n in item_numbers]


def steering_tensors(path: str | None, alphas: list[float] | None, config: ModelConfig
                     ) -> tuple[list[float], np.ndarray]:
  """-> (alphas, float32[alphas, layers, heads, head_dim]); zeros when there is no file."""
  shape = (config.num_layers, config.num_heads, config.head_dim)
  if path is None:
    alphas = alphas or list(DEFAULT_ALPHAS)
    return alphas, np.zeros((len(alphas), *shape), np.float32)
  with np.load(path) as f:
    steering, file_alphas = f["steering"].astype(np.float32), f["alphas"].astype(np.float32)
  if steering.shape != (len(file_alphas), *shape):
    raise SystemExit(f"--steering: {path}: 'steering' has shape {steering.shape}, expected "
                     f"{(len(file_alphas), *shape)} (alphas, layers, heads, head_dim)")
  if alphas is None:
    return [float(a) for a in file_alphas], steering
  index = []
  for alpha in alphas:
    hits = np.flatnonzero(np.isclose(file_alphas, alpha))
    if not hits.size:
      raise SystemExit(f"--alphas: {alpha} is not in {path} (alphas {file_alphas.tolist()})")
    index.append(int(hits[0]))
  return alphas, steering[index]


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--subject", default="172481", help="PAPI subject id whose 120 known "
                      "answers form the few-shot system prompt (default: %(default)s)")
  parser.add_argument("--items", default=DEFAULT_ITEMS, help="comma-separated IPIP-NEO item "
                      "numbers 1..300 to ask (item n is index n-1); default: the fixed 30-item "
                      "comparison case")
  parser.add_argument("--alphas", default=None, help="comma-separated steering strengths; "
                      "default 0,4 (zero steering vectors), or every alpha in --steering")
  parser.add_argument("--steering", default=None, help=".npz with 'steering' "
                      "float32[alphas, layers, heads, head_dim] (alpha*sigma*direction, added "
                      "before o_proj) and 'alphas' float32[alphas]; default: zeros")
  parser.add_argument("--max_new_tokens", type=int, default=15,
                      help="new tokens per prompt (default: 15, as the reference)")
  parser.add_argument("--batch_size", type=int, default=10,
                      help="prompts per generate call (default: 10, as the reference; it uses 3 "
                      "for 70B models)")
  parser.add_argument("--all_logits", action="store_true", help="compute prefill logits at "
                      "every prompt position, as the reference's Llama copy does (default: "
                      "last position only)")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads (default: torch's own default)")
  parser.add_argument("--json", default=None, help="write the raw results to this path")
  args = parser.parse_args(argv)
  args.items = parse_numbers(args.items, int, "--items")
  bad = [n for n in args.items if not 1 <= n <= data.NUM_ITEMS]
  if bad:
    raise SystemExit(f"--items: item numbers must be 1..{data.NUM_ITEMS}, got {bad}")
  args.alphas = None if args.alphas is None else parse_numbers(args.alphas, float, "--alphas")
  if args.max_new_tokens < 1 or args.batch_size < 1:
    raise SystemExit("--max_new_tokens and --batch_size must be >= 1")
  return args


def markdown_tables(result: dict) -> str:
  rows = result["alphas"]
  lines = ["| alpha | items | wall s | s / item | prompt tok | generated tok | forwards | tok/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in [*rows, result["total"]]:
    lines.append(f"| {r['alpha']} | {r['items']} | {r['wall_s']:.2f} | {r['s_per_item']:.3f} | "
                 f"{r['prompt_tokens']} | {r['generated_tokens']} | {r['forward_calls']} | "
                 f"{r['tokens_per_s']:.0f} |")
  lines += ["", "tok/s = (prompt + generated tokens) / wall s. Answers (letter parsed as "
            "`process_answers` does):", "",
            "| item | prompt tok | " + " | ".join(f"alpha {r['alpha']}" for r in rows) + " |",
            "| --- | --- | " + " | ".join("---" for _ in rows) + " |"]
  for i, item in enumerate(result["items"]):
    letters = " | ".join(r["answers"][i]["letter"] for r in rows)
    lines.append(f"| {item} | {result['prompt_tokens'][i]} | {letters} |")
  lines.append("| unparsable | | " + " | ".join(str(r["unparsable"]) for r in rows) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)

  t = time.perf_counter()
  path = gguf_loader.default_gguf_path()
  config, tensors = gguf_loader.read_gguf(path)
  model = build_model(config, tensors)
  del tensors
  tokenizer = tk.tokenizer_from_gguf(path)
  load_s = time.perf_counter() - t

  alphas, steering = steering_tensors(args.steering, args.alphas, config)
  batch = subject_prompts(tokenizer, args.subject, args.items)
  eos_id = tokenizer.eos_token_id
  hooks = OProjSteering(model, config)

  rows = []
  for alpha, delta in zip(alphas, steering, strict=True):
    hooks.set(delta)  # reset_all + set_activate
    answers, calls = [], 0
    start = time.perf_counter()
    for first in range(0, len(batch), args.batch_size):
      generated, n = reference_generate(model, batch[first:first + args.batch_size],
                                        args.max_new_tokens, eos_id, args.all_logits)
      calls += n
      for ids in generated:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        answers.append({"text": text, "letter": parse_letter(text), "new_tokens": len(ids)})
    wall = time.perf_counter() - start
    rows.append({"alpha": alpha, "items": len(batch), "wall_s": wall,
                 "s_per_item": wall / len(batch), "prompt_tokens": sum(map(len, batch)),
                 "generated_tokens": sum(a["new_tokens"] for a in answers),
                 "forward_calls": calls, "answers": answers,
                 "unparsable": sum(a["letter"] == UNPARSABLE for a in answers)})
    rows[-1]["tokens_per_s"] = (rows[-1]["prompt_tokens"] + rows[-1]["generated_tokens"]) / wall

  total = {key: sum(r[key] for r in rows) for key in
           ("items", "wall_s", "prompt_tokens", "generated_tokens", "forward_calls")}
  total.update(alpha="total", s_per_item=total["wall_s"] / total["items"],
               tokens_per_s=(total["prompt_tokens"] + total["generated_tokens"]) / total["wall_s"])
  result = {
      "what": "reference's PAS sweep (PyTorch + transformers): re-encode + greedy generate",
      "model": str(path), "subject": args.subject, "items": args.items,
      "prompt_tokens": [len(p) for p in batch], "max_new_tokens": args.max_new_tokens,
      "batch_size": args.batch_size, "all_logits": args.all_logits,
      "steering": args.steering or "zeros", "threads": torch.get_num_threads(),
      "torch": torch.__version__, "transformers": transformers.__version__,
      "machine": platform.machine(), "model_load_s": load_s, "alphas": rows, "total": total,
      "peak_rss_mb": peak_rss_mb(),
  }
  print(f"# reference_torch: subject {args.subject}, {len(batch)} items x {len(alphas)} alphas, "
        f"batches of {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}")
  print(f"model load (GGUF dequantize + torch model + tokenizer): {load_s:.2f} s\n")
  print(markdown_tables(result))
  print(f"\npeak RSS: {result['peak_rss_mb']:.0f} MB")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"raw results: {args.json}")
  return result


if __name__ == "__main__":
  main()
