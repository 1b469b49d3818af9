"""Sharding inside the compiled programs, on 8 simulated CPU devices (a subprocess, since the
device count is fixed when JAX starts).

* Tensor parallelism costs what it should: with q/k/v and gate/up stored fused
  (`models/params.py`), one decoder layer of the encode and score programs holds exactly two
  all-reduces (after `o_proj` and after `down_proj`) and no other collective. (With q, k and v
  concatenated inside the layer, the same program held 7 all-to-alls and 12
  collective-permutes per layer.)
* The programs themselves split rows over `data` (`parallel.constrain_rows`): given inputs
  copied to every device, each device still ends with only its rows of the cache, the
  scores, the gathered steering rows and the PAS fit, and the values equal one device's.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")

WORKER = r'''
import json, sys
sys.path[:0] = [sys.argv[2]]
import jax, jax.numpy as jnp, numpy as np
from palign_jax import parallel, scoring
from palign_jax.models.config import ModelConfig
from palign_jax.models.llama import init_params
from palign_jax.pas import fit as pas_fit

out = {}
config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                     num_heads=8, num_kv_heads=4, head_dim=8, tie_word_embeddings=True)
params = init_params(config, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, 256, (8, 32)), jnp.int32)
lengths = jnp.asarray(rng.integers(20, 33, 8), jnp.int32)
questions = jnp.asarray(rng.integers(0, 256, (4, 8)), jnp.int32)
q_lengths = jnp.full((4,), 8, jnp.int32)
options = jnp.arange(5, dtype=jnp.int32)

# 1. Tensor parallel over model=4 (data=2): the optimised HLO of both programs.
mesh = parallel.make_mesh(2, 4)
sharded = parallel.shard_params(params, mesh)
put = lambda x: parallel.put_batch(mesh, x)
cache = scoring.encode_prefixes(sharded, config, put(tokens), put(lengths), mesh=mesh)
out["hlo_encode"] = scoring.encode_prefixes.lower(
    sharded, config, put(tokens), put(lengths), mesh=mesh).compile().as_text()
out["hlo_score"] = scoring.score_on_prefixes.lower(
    sharded, config, cache, put(lengths), questions, q_lengths, options,
    mesh=mesh).compile().as_text()

# 2. data=8, inputs copied to every device: the programs split the rows themselves.
mesh = parallel.make_mesh(8, 1)
everywhere = lambda x: parallel.replicate(mesh, x)
params8 = parallel.shard_params(params, mesh)
steering = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (4, 2, 3, 8, 8))
index = (jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3]), jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1]))
rows = scoring.gather_rows(everywhere(steering), jax.tree.map(everywhere, index), mesh=mesh)
cache = scoring.encode_prefixes(params8, config, everywhere(tokens), everywhere(lengths), rows,
                                mesh=mesh)
scores = scoring.score_on_prefixes(params8, config, cache, everywhere(lengths), questions,
                                   q_lengths, options, rows, mesh=mesh)
activations = jax.random.normal(jax.random.PRNGKey(2), (40, 2, 3, 8, 8))
answers = jnp.asarray(rng.integers(0, 6, (16, 40)), jnp.int32)
settings = pas_fit.FitSettings(top_k=4, c=1.0, val_fraction=0.25, split_by="pairs",
                               min_items=2, max_iter=50, tol=1e-4)
fit = pas_fit.fit_pas(everywhere(activations), everywhere(answers), settings,
                      key=jax.random.PRNGKey(3), mesh=mesh)
shards = lambda x: sorted({tuple(s.data.shape) for s in x.addressable_shards})
out["rows"] = {"steering": shards(rows), "keys": shards(cache.keys), "mask": shards(cache.mask),
               "scores": shards(scores), "head_mask": shards(fit.head_mask),
               "directions": shards(fit.directions)}
# 3. The same programs on one device, without a mesh.
rows1 = steering[index]
cache1 = scoring.encode_prefixes(params, config, tokens, lengths, rows1)
scores1 = scoring.score_on_prefixes(params, config, cache1, lengths, questions, q_lengths,
                                    options, rows1)
fit1 = pas_fit.fit_pas(activations, answers, settings, key=jax.random.PRNGKey(3))
gap = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
out["gaps"] = {"keys": gap(cache.keys, cache1.keys), "scores": gap(scores, scores1),
               "directions": gap(fit.directions, fit1.directions),
               "head_mask": int(np.sum(np.asarray(fit.head_mask) != np.asarray(fit1.head_mask)))}
with open(sys.argv[1], "w") as f:
  json.dump(out, f)
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sharding")
  (folder / "worker.py").write_text(WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(folder / "worker.py"), str(folder / "out.json"),
                        str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  return json.loads((folder / "out.json").read_text())


def computations(hlo: str) -> dict[str, str]:
  """HLO module text -> {computation name: its body}."""
  found, name, lines = {}, None, []
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if header and line.rstrip().endswith("{"):
      name, lines = header.group(1), []
    elif line.startswith("}") and name:
      found[name], name = "\n".join(lines), None
    elif name:
      lines.append(line)
  return found


def layer_collectives(hlo: str) -> list[dict[str, int]]:
  """Collectives in the body of each while loop (the scan over layers)."""
  bodies = computations(hlo)
  return [{op: len(re.findall(rf" {op}(?:-start)?\(", bodies[name])) for op in COLLECTIVES}
          for name in re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)]


@pytest.mark.parametrize("program", ["hlo_encode", "hlo_score"])
def test_a_tensor_parallel_layer_all_reduces_twice_and_does_nothing_else(runs, program):
  loops = layer_collectives(runs[program])
  assert loops, "no scanned layer found in the compiled program"
  expected = dict.fromkeys(COLLECTIVES, 0) | {"all-reduce": 2}  # after o_proj, after down_proj
  assert loops == [expected] * len(loops)


def test_the_programs_split_rows_over_data_themselves(runs):
  rows = runs["rows"]
  # 8 (context, alpha) rows, 16 subjects over data=8: every device holds 1 and 2 of them.
  assert rows["steering"] == [[1, 3, 8, 8]]
  assert rows["keys"] == [[3, 1, 32, 4, 8]]
  assert rows["mask"] == [[1, 32]]
  assert rows["scores"] == [[1, 4, 5]]
  assert rows["head_mask"] == [[2, 3, 8]] and rows["directions"] == [[2, 3, 8, 8]]


def test_split_programs_compute_what_one_device_does(runs):
  gaps = runs["gaps"]
  assert gaps["keys"] < 1e-5 and gaps["scores"] < 1e-4 and gaps["directions"] < 1e-5
  assert gaps["head_mask"] == 0


def test_the_collective_counter_finds_collectives():
  # The counter itself must see what it counts, or the first test could pass on nothing.
  hlo = ("%body (p: f32[4]) -> f32[4] {\n  %a = f32[4] all-reduce(f32[4] %p), to_apply=%add\n"
         "  %b = f32[8] all-gather(f32[4] %a), dimensions={0}\n}\n\nENTRY %main () -> f32[4] {\n"
         "  %w = (f32[4]) while((f32[4]) %x), condition=%cond, body=%body\n}\n")
  assert layer_collectives(hlo) == [dict.fromkeys(COLLECTIVES, 0) | {"all-reduce": 1,
                                                                      "all-gather": 1}]
