"""The Hugging Face Llama format: export, `transformers` reading it, import, and the tokenizers.

Everything is built locally (random models, tokenizers learned from a string); nothing is fetched.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from gpt import GPT, GPTConfig, load_hf
from gpt.checkpoint import FORMAT_VERSION
from gpt.errors import CheckpointError, ConfigError
from gpt.export import main as export_main
from gpt.hf import export_hf, half_to_interleaved, interleaved_to_half, rope_layout
from gpt.tokenizer import CharTokenizer, build_tokenizer
from kernels import reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub; make sure none is asked
pytestmark = pytest.mark.requires("transformers", "safetensors")

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nAy me!  Two  spaces, 'quotes'.\n"


def random_model(tok, **kw) -> GPT:
    """A small GQA model with every weight random (norm gains too, so a mistaken mapping shows)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, **kw)
    model = GPT(cfg, kernels="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.from_text(TEXT)


def hf_model(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def greedy(step, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        idx = torch.cat([idx, step(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_rope_layout_is_found_by_probing_and_the_permutation_converts_interleaved_pairs():
    assert rope_layout(8) == rope_layout(64) == "half"  # as Llama in transformers
    d, heads = 8, 3
    w = torch.randn(heads * d, 5)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, heads), heads), w)
    # An interleaved RoPE (pairs 2i, 2i+1) on rows w equals the half RoPE on the permuted rows.
    x = torch.randn(5)
    angle = torch.rand(1, d // 2)
    q_inter = (w @ x).view(heads, d)
    a, b = q_inter[:, 0::2], q_inter[:, 1::2]
    rot = torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1).view(heads, d)
    q_half = (interleaved_to_half(w, heads) @ x).view(1, heads, 1, d)
    rot_half = reference.rope(q_half, angle.cos(), angle.sin()).view(heads, d)
    torch.testing.assert_close(rot_half, interleaved_to_half(rot.reshape(-1, 1), heads).view(heads, d))


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_reads_the_export_and_computes_the_same_model(tmp_path, char_tok, tied):
    model = random_model(char_tok, tie_weights=tied)
    export_hf(model, char_tok, tmp_path / "hf")
    hf = hf_model(tmp_path / "hf")
    assert hf.config.tie_word_embeddings == tied and hf.config.num_key_value_heads == 2
    idx = torch.randint(0, char_tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours32, theirs = model(idx)[0], hf(idx).logits
        ours64 = model.double()(idx)[0]
        model.float()
    # transformers must be as close to the float64 truth as our own float32 forward is (2x: the
    # accuracy rule of the kernel tests), plus 1e-6 for ties where our float32 error is ~0.
    ours_err = (ours32.double() - ours64).abs().max().item()
    theirs_err = (theirs.double() - ours64).abs().max().item()
    assert theirs_err <= 2 * ours_err + 1e-6, (theirs_err, ours_err)
    # The same greedy continuation, 50 tokens.
    prompt = idx[:1, :8]
    with torch.no_grad():
        a = greedy(lambda x: model(x)[0], prompt, 50)
        b = hf.generate(prompt, max_new_tokens=50, do_sample=False, attention_mask=torch.ones_like(prompt),
                        eos_token_id=None, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tied", [True, False])
def test_export_then_import_returns_bit_identical_weights(tmp_path, char_tok, tied):
    model = random_model(char_tok, tie_weights=tied)
    export_hf(model, char_tok, tmp_path / "hf")
    back, tok = load_hf(tmp_path / "hf", kernels="torch")
    assert back.config == model.config and tok.to_dict() == char_tok.to_dict()
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (back.lm_head.weight is back.wte.weight) == tied


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_autotokenizer_encodes_and_decodes_like_ours(tmp_path, kind):
    if kind == "gpt2":
        pytest.importorskip("tiktoken", reason="the gpt2 tokenizer needs tiktoken")
    texts = [TEXT, "  leading and trailing  ", "a\n\n\nb", "What's this ? !", "ünïcode 日本語 12345 <|endoftext|> x"]
    tok = {"char": lambda: CharTokenizer.from_text("".join(texts)),
           "bpe": lambda: build_tokenizer("bpe", [TEXT] * 20, 300),
           "gpt2": lambda: build_tokenizer("gpt2")}[kind]()
    export_hf(random_model(tok), tok, tmp_path / "hf")
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in texts:
        ids = tok.encode(text)
        assert auto.encode(text) == ids, text
        assert auto.decode(ids) == tok.decode(ids) == text
    assert load_hf(tmp_path / "hf", kernels="torch")[1].to_dict() == tok.to_dict()


def test_a_folder_saved_by_transformers_imports_untied_with_its_tokenizer(tmp_path, char_tok):
    """No tritongpt.json: the config, untied head and tokenizer all come from transformers' own files."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=char_tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    fast = PreTrainedTokenizerFast(tokenizer_object=char_tok.to_hf(), clean_up_tokenization_spaces=False)
    fast.save_pretrained(tmp_path / "hf")
    model, tok = load_hf(tmp_path / "hf", kernels="torch")
    assert not model.config.tie_weights and model.config.n_kv_head == 1 and model.config.hidden_size == 160
    assert tok.encode(TEXT) == char_tok.encode(TEXT) and tok.decode(tok.encode(TEXT)) == TEXT
    idx = torch.randint(0, char_tok.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("field, value", [("mlp", "gelu"), ("norm", "layer"), ("bias", True)])
def test_a_config_llama_cannot_express_is_a_one_line_error_naming_the_field(tmp_path, char_tok, field, value):
    model = random_model(char_tok, **{field: value})
    with pytest.raises(ConfigError, match=f"GPTConfig.{field}="):
        export_hf(model, char_tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("key, value", [("attention_bias", True), ("hidden_act", "gelu"),
                                        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                        ("model_type", "gpt2")])
def test_importing_what_this_model_cannot_run_names_the_field(tmp_path, char_tok, key, value):
    export_hf(random_model(char_tok), char_tok, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=key):
        load_hf(tmp_path / "hf")


def test_export_command_line(tmp_path, char_tok, capsys):
    model = random_model(char_tok)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format_version": FORMAT_VERSION, "model": model.state_dict(), "model_config": model.config.to_dict(),
                "tokenizer": char_tok.to_dict()}, ckpt)
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).exists(), name
    assert export_main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
