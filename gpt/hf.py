"""The Hugging Face Llama format: export a model to a folder `transformers` reads, and build one from such
a folder.

The model is a Llama decoder: pre-norm blocks of RMSNorm, grouped-query attention with RoPE and a
SwiGLU MLP, no biases, an optional tied head. What differs is only how the weights are stored:

| here                                   | Hugging Face (LlamaForCausalLM)                         |
|----------------------------------------|---------------------------------------------------------|
| wte                                    | model.embed_tokens                                      |
| blocks.i.norm_attn / norm_mlp          | model.layers.i.input_layernorm / post_attention_layernorm |
| blocks.i.attn.c_attn, rows [q | k | v] | model.layers.i.self_attn.q_proj, k_proj, v_proj         |
| blocks.i.attn.c_proj                   | model.layers.i.self_attn.o_proj                         |
| blocks.i.mlp.c_fc, rows [gate | up]    | model.layers.i.mlp.gate_proj, up_proj                   |
| blocks.i.mlp.c_proj                    | model.layers.i.mlp.down_proj                            |
| norm_f                                 | model.norm                                              |
| lm_head (absent when tied)             | lm_head (absent when tie_word_embeddings)               |

RoPE: Llama in `transformers` rotates halves (dimension j pairs with j + D/2); Meta's original
checkpoints rotate interleaved pairs (2i, 2i+1), and converting between the two permutes the rows of
q and k. `rope_layout()` finds this model's layout by running its RoPE on basis vectors, and q/k rows
are permuted if and only if it is not the half layout.

A folder holds config.json, model.safetensors, generation_config.json, tokenizer.json and
tokenizer_config.json (read by `AutoTokenizer`), and tritongpt.json (this package's model config and
tokenizer description, so that a folder exported here comes back exactly). Writing needs only
`safetensors` and `tokenizers`; `transformers` is needed to read the folder there, not here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kernels import reference

from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .files import atomic_path, atomic_write_text
from .model import GPT
from .optional import import_optional
from .tokenizer import BPETokenizer, Tokenizer, tokenizer_from_dict

SIDECAR = "tritongpt.json"
SIDECAR_FORMAT = 1
_NEEDS = ("the Hugging Face format (python -m gpt.export, gpt.load_hf, --init-from)",
          "install the extra: pip install 'tritongpt[hf]'")


def _safetensors():
    return import_optional("safetensors.torch", *_NEEDS, pip_name="safetensors")


# -- RoPE layout -----------------------------------------------------------------------------------------
def rope_layout(head_dim: int = 8) -> str:
    """'half' if this model's RoPE pairs dimension j with j + D/2 (as Llama in transformers does),
    'interleaved' if it pairs 2i with 2i + 1; found by rotating basis vectors, not assumed."""
    angle = torch.full((1, head_dim // 2), 0.5)
    eye = torch.eye(head_dim).view(head_dim, 1, 1, head_dim)  # (B=D, H=1, T=1, D): one basis vector per row
    out = reference.rope(eye, angle.cos(), angle.sin()).view(head_dim, head_dim)
    # The other dimension each basis vector is rotated into.
    moved = [[k for k in range(head_dim) if k != j and abs(out[j, k]) > 1e-6] for j in range(head_dim)]
    if all(m == [(j + head_dim // 2) % head_dim] for j, m in enumerate(moved)):
        return "half"
    if all(m == [j ^ 1] for j, m in enumerate(moved)):
        return "interleaved"
    raise RuntimeError(f"unrecognized RoPE layout: basis vectors rotate into {moved}")


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q or k projection (n_heads * D, in) from the interleaved RoPE layout to the
    half layout: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...)."""
    d = w.shape[0] // n_heads
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return w.view(n_heads, d, -1)[:, order].reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    d = w.shape[0] // n_heads
    order = torch.empty(d, dtype=torch.long)
    order[torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])] = torch.arange(d)
    return w.view(n_heads, d, -1)[:, order].reshape(w.shape)


# -- export -----------------------------------------------------------------------------------------------
def check_exportable(config: GPTConfig) -> None:
    """A ConfigError naming the first field Llama cannot express."""
    if config.mlp != "swiglu":
        raise ConfigError(f"GPTConfig.mlp={config.mlp!r}: the Llama format has a SwiGLU MLP only; models with "
                          f"mlp='gelu' cannot be exported to it")
    if config.norm != "rms":
        raise ConfigError(f"GPTConfig.norm={config.norm!r}: the Llama format has RMSNorm only; models with "
                          f"norm='layer' cannot be exported to it")
    if config.bias:
        raise ConfigError("GPTConfig.bias=True: the Llama format has no biases in its norms; models with biases "
                          "cannot be exported to it")


def llama_config(config: GPTConfig, eot_id: int | None, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM. rope_theta is written both the transformers 4 way (top level) and
    the transformers 5 way (rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_weights,
        "initializer_range": config.init_std,
        "bos_token_id": None,  # these models start from no special token
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Llama's names (contiguous tensors, tied head once)."""
    c = model.config
    check_exportable(c)
    permute = rope_layout(c.head_dim) != "half"
    out = {"model.embed_tokens.weight": model.wte.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split(block.attn.qkv_sizes)
        if permute:
            q, k = interleaved_to_half(q, c.n_head), interleaved_to_half(k, c.n_kv_head)
        gate, up = block.mlp.c_fc.weight.split(block.mlp.fc_sizes)
        out.update({
            p + "input_layernorm.weight": block.norm_attn.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.c_proj.weight,
            p + "post_attention_layernorm.weight": block.norm_mlp.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.c_proj.weight,
        })
    out["model.norm.weight"] = model.norm_f.weight
    if not c.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json: `AutoTokenizer.from_pretrained` then encodes and decodes
    exactly like `tokenizer` (no BOS/EOS added, no clean-up of spaces before punctuation)."""
    eot = None if tokenizer.eot_id is None else tokenizer.decode([tokenizer.eot_id])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": block_size,
        **({"eos_token": eot} if eot is not None else {}),
    }
    return {"tokenizer.json": tokenizer.to_hf().to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face Llama folder (see the module docstring)."""
    out = Path(out_dir)
    weights = {k: v.to(dtype) for k, v in to_hf_state_dict(model).items()}  # checks the config first
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    with atomic_path(out / "model.safetensors") as tmp:  # safetensors itself would leave the file 0600
        _safetensors().save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(llama_config(c, tokenizer.eot_id, dtype), indent=2))
    generation = {"bos_token_id": None, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id}
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2))
    for name, text in tokenizer_files(tokenizer, c.block_size).items():
        atomic_write_text(out / name, text)
    tok = tokenizer.to_dict()
    if tok["kind"] == "bpe":
        tok = {k: v for k, v in tok.items() if k != "json"}  # it is tokenizer.json
    atomic_write_text(out / SIDECAR, json.dumps({"format": SIDECAR_FORMAT, "model_config": c.to_dict(),
                                                 "tokenizer": tok}, indent=2))
    return out


# -- import -----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a Hugging Face model folder: {path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def gpt_config_from_llama(hf: dict, block_size: int | None = None) -> GPTConfig:
    """GPTConfig for a Llama config.json; anything the model here cannot run is a CheckpointError naming it."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"config.json: model_type={hf.get('model_type')!r}; only Llama-architecture folders "
                              f"(model_type 'llama') can be imported")
    def need(key, ok, what):
        if not ok:
            raise CheckpointError(f"config.json: {key}={hf.get(key)!r}; this model supports {what} only")
    need("hidden_act", hf.get("hidden_act", "silu") == "silu", "SiLU (SwiGLU) MLPs")
    need("attention_bias", not hf.get("attention_bias", False), "attention without biases")
    need("mlp_bias", not hf.get("mlp_bias", False), "MLPs without biases")
    rope = hf.get("rope_parameters") or {}
    need("rope_scaling", not hf.get("rope_scaling") and rope.get("rope_type", "default") == "default",
         "plain RoPE (no rope_scaling / rope_type other than 'default')")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    need("head_dim", hf.get("head_dim") in (None, n_embd // n_head), "head_dim = hidden_size / num_attention_heads")
    try:
        return GPTConfig(
            block_size=block_size or hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=n_embd, mlp="swiglu", mlp_hidden=hf["intermediate_size"], norm="rms",
            norm_eps=hf.get("rms_norm_eps", 1e-6), bias=False,
            tie_weights=bool(hf.get("tie_word_embeddings", False)),  # Llama's default is untied
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            init_std=hf.get("initializer_range", 0.02))
    except KeyError as e:
        raise CheckpointError(f"config.json has no {e.args[0]!r}, which a Llama config needs") from None
    except ConfigError as e:
        raise CheckpointError(f"config.json describes a model this package cannot build: {e}") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = _safetensors()
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder} has no model.safetensors (or model.safetensors.index.json); "
                              f"only safetensors weights are read (a .bin/.pth needs pickle)")
    weights = {}
    for name in files:
        try:
            weights.update(st.load_file(str(folder / name)))
        except Exception as e:  # safetensors raises its own SafetensorError for a torn or foreign file
            raise CheckpointError(f"{folder / name} is not a readable safetensors file ({e})") from None
    return weights


def from_hf_state_dict(weights: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict from Llama-named weights (cast to float32), the inverse of `to_hf_state_dict`."""
    permute = rope_layout(config.head_dim) != "half"
    def take(name):
        try:
            return weights.pop(name).float()
        except KeyError:
            raise CheckpointError(f"the safetensors weights have no {name!r}") from None
    sd = {"wte.weight": take("model.embed_tokens.weight")}
    for i in range(config.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        q, k = take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight")
        if permute:
            q, k = half_to_interleaved(q, config.n_head), half_to_interleaved(k, config.n_kv_head)
        sd[b + "attn.c_attn.weight"] = torch.cat([q, k, take(p + "self_attn.v_proj.weight")])
        sd[b + "attn.c_proj.weight"] = take(p + "self_attn.o_proj.weight")
        sd[b + "norm_attn.weight"] = take(p + "input_layernorm.weight")
        sd[b + "norm_mlp.weight"] = take(p + "post_attention_layernorm.weight")
        sd[b + "mlp.c_fc.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        sd[b + "mlp.c_proj.weight"] = take(p + "mlp.down_proj.weight")
    sd["norm_f.weight"] = take("model.norm.weight")
    head = weights.pop("lm_head.weight", None)
    if config.tie_weights:
        sd["lm_head.weight"] = sd["wte.weight"]
    elif head is None:
        raise CheckpointError("tie_word_embeddings is false but the weights have no 'lm_head.weight'")
    else:
        sd["lm_head.weight"] = head.float()
    leftover = sorted(k for k in weights if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise CheckpointError(f"the safetensors weights hold tensors a Llama model does not have: {leftover[:5]}")
    return sd


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """The folder's tokenizer: exactly ours for a folder exported here (tritongpt.json), otherwise its
    tokenizer.json (any `tokenizers` model) with the end-of-text token named in tokenizer_config.json."""
    folder = Path(folder)
    sidecar = folder / SIDECAR
    if sidecar.exists():
        tok = dict(_read_json(sidecar)["tokenizer"])
        if tok["kind"] == "bpe":
            tok["json"] = (folder / "tokenizer.json").read_text(encoding="utf-8")
        return tokenizer_from_dict(tok)
    if not (folder / "tokenizer.json").exists():
        raise CheckpointError(f"{folder} has no tokenizer.json: a tokenizer in the fast (tokenizers) format is "
                              f"needed; export one with transformers' save_pretrained")
    cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return BPETokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"), eos)


def load_hf(folder: str | Path, device: torch.device | str = "cpu", kernels: str = "auto",
            block_size: int | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode on `device` with float32 weights, tokenizer) from a local Hugging Face Llama
    folder. block_size: the longest context to allocate RoPE tables for (default: the folder's
    max_position_embeddings, or the exported model's own block size)."""
    config, state_dict, tokenizer = read_hf(folder, block_size)
    model = GPT(config, kernels=kernels)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), tokenizer


def read_hf(folder: str | Path, block_size: int | None = None) -> tuple[GPTConfig, dict, Tokenizer]:
    """(GPTConfig, our state dict in float32, tokenizer) of a local Hugging Face Llama folder, checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory; pass a Hugging Face model folder "
                              f"(one written by python -m gpt.export, or by save_pretrained)")
    sidecar = folder / SIDECAR
    hf_config = _read_json(folder / "config.json")
    config = gpt_config_from_llama(hf_config, block_size)
    if sidecar.exists():  # exported here: the exact original config (the same architecture, checked)
        saved = GPTConfig.from_dict(_read_json(sidecar)["model_config"])
        if saved.hidden_size != config.hidden_size or saved.tie_weights != config.tie_weights:
            raise CheckpointError(f"{sidecar} does not match config.json; delete {sidecar.name} to use config.json")
        config = GPTConfig.from_dict({**saved.to_dict(), **({"block_size": block_size} if block_size else {})})
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size} embedding rows")
    return config, from_hf_state_dict(_read_weights(folder), config), tokenizer
