import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gpt import GPT, GPTConfig, create_model, ops, preset_config
from gpt.config import NOMINAL_PARAMS, PRESETS
from gpt.errors import ConfigError
from kernels import reference


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_param_count_near_nominal(preset):
    cfg = preset_config(preset)
    model = GPT(cfg) if preset != "large" else None
    if model is None:  # 350M fp32 weights on CPU just to count: compute from shapes instead
        import torch
        with torch.device("meta"):
            model = GPT(cfg)
    n = model.num_params()
    assert abs(n - NOMINAL_PARAMS[preset]) <= 0.2 * NOMINAL_PARAMS[preset], f"{preset}: {n:,} params"


def test_param_count_matches_hand_count():
    c = GPTConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, block_size=16)
    D = 8
    attn = 32 * (4 + 2 * 2) * D + 4 * D * 32
    mlp = 32 * 2 * 64 + 64 * 32
    norms = 2 * 32
    expected = 100 * 32 + 2 * (attn + mlp + norms) + 32  # tied lm_head counted once; final norm
    assert GPT(c).num_params() == expected
    untied = GPTConfig(**{**c.to_dict(), "tie_weights": False})
    assert GPT(untied).num_params() == expected + 100 * 32


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_flops_per_token_matches_a_counted_training_step(mlp):
    """PyTorch's FlopCounterMode counts every matmul of a forward + backward. The formula's 6N includes
    the norm gains, which do no matmul (6 FLOPs per gain per token), and counts attention without the
    causal halving, as the reference attention computes it (full score matrix, then the mask)."""
    c = GPTConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, mlp=mlp)
    model = GPT(c, kernels="torch")
    model.ops = dataclasses.replace(ops.TORCH_OPS, attention=reference.attention)
    B, T = 3, 16
    idx = torch.randint(0, 100, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    norm_gains = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert counter.get_total_flops() == B * T * (model.flops_per_token(T) - 6 * norm_gains)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=100, n_head=3), "n_embd"),
    (dict(n_head=6, n_kv_head=4, n_embd=48), "n_kv_head"),
    (dict(n_embd=36, n_head=4, n_kv_head=4), "n_head"),  # head_dim 9 is odd
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batch"), "norm"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layer=0), "n_layer"),
])
def test_invalid_config_names_field_and_fix(kwargs, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}: .*; "):
        GPTConfig(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of: tiny, small, medium, large"):
        create_model("huge")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        create_model("tiny", n_layers=3)


def test_kernel_choice_is_a_runtime_option_not_a_config_field():
    assert "kernels" not in GPTConfig().to_dict() and "gradient_checkpointing" not in GPTConfig().to_dict()
    with pytest.raises(ConfigError, match="unknown field"):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "kernels": "triton"})
    with pytest.raises(ConfigError, match="unknown kernels mode 'cuda'; use one of auto, triton, torch"):
        create_model("tiny", n_layer=1, kernels="cuda")
    model = create_model("tiny", n_layer=1, kernels="torch")
    assert model.kernels == "torch" and model.kernels_in_use() == "torch" and "kernels=torch -> torch (cpu)" in repr(model)
    assert model.use_kernels("auto") is model and model.kernels == "auto"


def test_config_dict_round_trip():
    c = preset_config("small", vocab_size=65, dropout=0.1)
    assert GPTConfig.from_dict(c.to_dict()) == c
