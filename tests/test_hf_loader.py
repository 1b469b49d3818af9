"""Local Hugging Face folders: tiny random transformers models saved and read back."""

import json

import numpy as np
import pytest

from palign_jax.errors import UserInputError
from palign_jax.models import hf_loader
from palign_jax.models.config import ModelConfig
from palign_jax.models.params import params_from_hf_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
             max_position_embeddings=128)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def save_tiny(folder, family="llama", tied=False, dtype=torch.float32, seed=0, save=None):
  config_class, model_class = FAMILIES[family]
  torch.manual_seed(seed)
  config = config_class(**SMALL, tie_word_embeddings=tied, rope_theta=25000.0)
  model = model_class(config).to(dtype)
  with torch.no_grad():  # random norms and biases too, so every tensor is distinguishable
    for name, value in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        value.copy_(torch.randn_like(value))
  model.save_pretrained(folder, **(save or {}))
  return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_reads_tensors_and_config(tmp_path, family, tied):
  state = save_tiny(tmp_path, family, tied)
  config, tensors = hf_loader.read_hf_folder(tmp_path)
  assert config == ModelConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=25000.0,
      attention_bias=family == "qwen2", tie_word_embeddings=tied,
      max_position_embeddings=128, architecture=family)
  expected = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
  assert set(tensors) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)

  _, params = hf_loader.load_hf_folder(tmp_path)
  reference = params_from_hf_tensors(config, state)
  assert _flat(params).keys() == _flat(reference).keys()
  for key, value in _flat(reference).items():
    np.testing.assert_array_equal(_flat(params)[key], value, err_msg=key)


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def test_sharded_checkpoint(tmp_path):
  sharded = tmp_path / "sharded"
  state = save_tiny(sharded, "llama", save={"max_shard_size": "20KB"})
  assert (sharded / hf_loader.INDEX_FILE).is_file()
  assert len(hf_loader.safetensors_files(sharded)) > 2
  _, tensors = hf_loader.read_hf_folder(sharded)
  for name, value in state.items():
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_bfloat16_checkpoint(tmp_path):
  state = save_tiny(tmp_path, "qwen2", dtype=torch.bfloat16)
  _, tensors = hf_loader.read_hf_folder(tmp_path)
  assert tensors["model.embed_tokens.weight"].dtype.name == "bfloat16"
  for name, value in state.items():  # bf16 -> f32 is exact
    np.testing.assert_array_equal(tensors[name].astype(np.float32), value, err_msg=name)


def test_rope_parameters_of_transformers_5_are_read():
  hf = {"architectures": ["LlamaForCausalLM"], **SMALL, "head_dim": 8,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}}
  hf["num_hidden_layers"] = 2
  flat = hf_loader.flatten_rope_parameters(hf)
  assert flat["rope_theta"] == 500000.0 and flat["rope_scaling"]["factor"] == 8.0
  old_style = {**hf, "rope_theta": 10.0}
  assert hf_loader.flatten_rope_parameters(old_style)["rope_theta"] == 10.0


# --- bad input ---------------------------------------------------------------------------

def test_missing_folder_and_config(tmp_path):
  with pytest.raises(UserInputError, match=r"nowhere: model folder not found"):
    hf_loader.read_hf_folder(tmp_path / "nowhere")
  with pytest.raises(UserInputError, match=r"config\.json: config\.json not found"):
    hf_loader.read_hf_folder(tmp_path)


def test_unsupported_architecture_names_config_json(tmp_path):
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
  with pytest.raises(UserInputError, match=r"config\.json: field 'architectures' is "
                     r"\['GPT2LMHeadModel'\]"):
    hf_loader.read_hf_folder(tmp_path)


def test_bad_json(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserInputError, match=r"config\.json: not valid JSON"):
    hf_loader.read_hf_folder(tmp_path)


def test_shape_mismatch_names_the_safetensors_file(tmp_path):
  save_tiny(tmp_path, "llama")
  config = json.loads((tmp_path / "config.json").read_text())
  config["intermediate_size"] = 40
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserInputError, match=r"model\.safetensors: tensor 'model.layers.0.mlp"
                     r"\.gate_proj.weight' has shape \(48, 32\), but .*config\.json implies "
                     r"\(40, 32\)"):
    hf_loader.read_hf_folder(tmp_path)


def test_missing_tensor_and_missing_shard(tmp_path):
  state = save_tiny(tmp_path, "llama")
  from safetensors.numpy import save_file
  del state["model.norm.weight"]
  save_file(state, tmp_path / "model.safetensors")
  with pytest.raises(UserInputError, match=r"tensor 'model.norm.weight' is missing"):
    hf_loader.read_hf_folder(tmp_path)

  sharded = tmp_path / "sharded"
  save_tiny(sharded, "llama", save={"max_shard_size": "20KB"})
  next(iter(sorted(sharded.glob("*.safetensors")))).unlink()
  with pytest.raises(UserInputError, match=r"index\.json: names shard 'model-00001-of-.*', "
                     "which is missing"):
    hf_loader.read_hf_folder(sharded)


def test_no_safetensors_and_corrupt_safetensors(tmp_path):
  save_tiny(tmp_path, "llama")
  weights = tmp_path / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(UserInputError, match=r"model\.safetensors: not a readable safetensors"):
    hf_loader.read_hf_folder(tmp_path)
  weights.unlink()
  with pytest.raises(UserInputError, match=r"no \*\.safetensors files"):
    hf_loader.read_hf_folder(tmp_path)
