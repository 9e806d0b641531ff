"""int8 weight-only quantization (gpt/quantize.py): the per-channel error bound of a quantized linear
layer, checked exactly; what it costs a model that has learned something (loss, greedy text); storage
(int8, half the bytes of bf16, buffers not parameters); the tied head; autocast and bf16 weights;
refusing a model in training mode; python -m gpt.sample --quantize int8."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import GPT, GPTConfig, quantize_int8
from gpt import quantize as qz
from gpt import sample as cli
from gpt.errors import ConfigError
from gpt.quantize import Int8Linear, int8_matmul, quantize_weight, weight_nbytes
from gpt.tokenizer import CharTokenizer


def small_gpt(tie: bool = True, bias: bool = False, vocab: int = 16) -> GPT:
    torch.manual_seed(3)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32,
                         tie_weights=tie, bias=bias), kernels="torch").eval()


def linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}


# -- one layer: the bound ----------------------------------------------------------------------
def check_bound(weight, scale, q, x):
    """max over rows and channels of |y_int8 - y_float| / bound, where y_int8 = (x @ q.T) * scale in
    float64 and bound_j = scale_j / 2 * sum_i |x_i| (each weight is off by at most scale_j / 2)."""
    y_float = x.double() @ weight.double().T
    y_q = (x.double() @ q.double().T) * scale.double()
    bound = scale.double() / 2 * x.double().abs().sum(-1, keepdim=True)
    return ((y_q - y_float).abs() / bound).max().item()


@pytest.mark.parametrize("out_f, in_f", [(96, 64), (37, 53), (1, 5)])
def test_int8_linear_output_is_within_the_per_channel_bound(out_f, in_f):
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 1, out_f).unsqueeze(1))   # rows of very different size
    m = Int8Linear.from_linear(lin)
    # Random rows, and per output channel j the row sign(w_j - dequantized w_j): the input that makes
    # channel j's error largest (the sum of its weights' errors), so a quantizer off by more than scale/2
    # somewhere fails here.
    err = lin.weight.detach().double() - m.dequantized_weight(torch.float64)
    x = torch.cat((torch.randn(7, in_f), torch.sign(err).float()))
    # The int8 representation itself, in float64: never past the bound.
    assert check_bound(lin.weight, m.scale, m.weight_int8, x) <= 1.0
    # The layer as it runs (fused CPU kernel, fp32): the bound plus fp32 rounding of a K-term dot product.
    with torch.no_grad():
        y_float = x.double() @ lin.weight.double().T + lin.bias.double()
        y = m(x)
    bound = m.scale.double() / 2 * x.double().abs().sum(-1, keepdim=True)
    fp32_slack = 4 * in_f * torch.finfo(torch.float32).eps * (x.double().abs() @ lin.weight.double().abs().T + 1)
    assert y.dtype == torch.float32
    assert ((y.double() - y_float).abs() <= bound + fp32_slack).all()
    # The bound is not vacuous: an input aligned with the rounding errors reaches half of it and more.
    x_worst = torch.sign(err)
    ratio = torch.diagonal(x_worst @ err.T) / (m.scale.double() / 2 * x_worst.abs().sum(-1))
    if in_f >= 50:
        assert ratio.min() > 0.3


def test_the_bound_check_fails_for_a_wrong_quantizer():
    """Truncating instead of rounding doubles the worst error (and the mean): the check above catches it."""
    w = torch.randn(64, 64)
    q, scale = quantize_weight(w)
    q_trunc = torch.trunc(w / scale.unsqueeze(1)).to(torch.int8)
    x = torch.sign(w - q_trunc.float() * scale.unsqueeze(1))   # worst case for the truncation
    assert check_bound(w, scale, q, x) <= 1.0
    assert check_bound(w, scale, q_trunc, x) > 1.0


def test_quantized_weights_are_int8_symmetric_per_output_channel():
    w = torch.randn(10, 33)
    w[3] = 0.0                                                 # a zero row: scale 1, no NaN
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (10,)
    assert q.abs().max() <= 127 and (q == -128).sum() == 0
    nonzero = torch.arange(10) != 3
    assert (q[nonzero].abs().amax(1) == 127).all()
    torch.testing.assert_close(scale[nonzero], w[nonzero].abs().amax(1) / 127)
    assert (q[3] == 0).all() and scale[3] == 1
    # Symmetric: negating the weight negates q and keeps the scale.
    q_neg, scale_neg = quantize_weight(-w)
    assert torch.equal(q_neg, -q) and torch.equal(scale_neg, scale)
    # A bf16 weight keeps a bf16 scale, and the rounding is against the stored scale.
    wb = w.bfloat16()
    qb, sb = quantize_weight(wb)
    assert sb.dtype == torch.bfloat16
    assert ((wb.double() - qb.double() * sb.double().unsqueeze(1)).abs() <= sb.double().unsqueeze(1) / 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 3, 48), (4, 16, 48)])
def test_fused_kernel_and_fallback_agree(dtype, shape):
    x = torch.randn(shape).to(dtype)
    q, scale = quantize_weight(torch.randn(24, 48))
    out = int8_matmul(x, q, scale)          # CPU: _weight_int8pack_mm for decoding rows, else the fallback
    ref = (F.linear(x.float(), q.float()) * scale).to(dtype)
    assert out.shape == (*shape[:-1], 24) and out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # A non-contiguous input, and an input that needs gradients (the fused op has no backward).
    xt = torch.randn(48, shape[1]).to(dtype).T
    torch.testing.assert_close(int8_matmul(xt, q, scale), int8_matmul(xt.contiguous(), q, scale))
    xg = x.float().requires_grad_()
    int8_matmul(xg, q, scale).sum().backward()
    torch.testing.assert_close(xg.grad, (q.float() * scale.unsqueeze(1)).sum(0).expand_as(xg))


def test_cpu_uses_the_fused_int8_kernel_for_decoding_rows_only():
    if qz._PACK_MM is None:
        pytest.skip("this torch has no aten._weight_int8pack_mm")
    q, scale = quantize_weight(torch.randn(8, 16))
    for dtype, rows in ((torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 8)):
        x = torch.randn(rows, 16).to(dtype)
        assert torch.equal(int8_matmul(x, q, scale), torch.ops.aten._weight_int8pack_mm(x, q, scale.to(dtype)))
    for dtype, rows in ((torch.float32, 2), (torch.bfloat16, 9)):   # prefill / evaluation: dequantize + matmul
        x = torch.randn(rows, 16).to(dtype)
        assert torch.equal(int8_matmul(x, q, scale), F.linear(x, q.to(dtype)) * scale.to(dtype))


# -- the model -------------------------------------------------------------------------------
def trained_gpt(steps: int = 150) -> tuple[GPT, torch.Tensor]:
    """A small GPT trained briefly on a 'language' where each token is followed by a fixed successor
    90% of the time (else a random token), so it has sharp, learned predictions; and held-out data."""
    torch.manual_seed(0)
    V, T = 16, 32
    succ = torch.randperm(V)

    def data(n):
        x = torch.empty(n, T + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (n,))
        for t in range(T):
            noise = torch.rand(n) < 0.1
            x[:, t + 1] = torch.where(noise, torch.randint(0, V, (n,)), succ[x[:, t]])
        return x

    model = small_gpt(tie=True, vocab=V).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        b = data(16)
        _, loss = model(b[:, :-1], targets=b[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data(64)


def test_quantized_model_loss_and_greedy_text_barely_change():
    model, held_out = trained_gpt()
    q = quantize_int8(copy.deepcopy(model))
    x, y = held_out[:, :-1], held_out[:, 1:]
    with torch.no_grad():
        logits, loss = model(x, targets=y)
        logits_q, loss_q = q(x, targets=y)
    # Learned: well below the uniform ln(16) = 2.77 (the floor of this data is about 0.53 nats).
    assert loss.item() < 1.2
    # Every weight moves by at most 1/254 of its row's largest |w| (a quarter of that on average, with
    # random signs), so each layer's output moves by a fraction of a percent of its own scale: the logits
    # by < 1% of theirs (measured 0.16%) and the cross-entropy by far less than 0.002 nats (measured 5e-6).
    assert abs(loss_q.item() - loss.item()) < 0.002
    assert (logits_q - logits).abs().max() < 0.01 * logits.abs().max()
    # Greedy continuations agree token for token (the learned predictions have margins far above that).
    prompt = held_out[:4, :4]
    assert torch.equal(q.generate(prompt, 24, temperature=0), model.generate(prompt, 24, temperature=0))


def test_every_block_linear_and_the_head_become_int8_buffers():
    model = small_gpt(tie=False, bias=True)
    n_params = model.num_params()
    q = quantize_int8(copy.deepcopy(model))
    layers = linears(q)
    assert len(layers) == 4 * 2 + 1 and all(isinstance(m, Int8Linear) for m in layers.values())
    for name, m in layers.items():
        assert m.weight_int8.dtype == torch.int8 and list(m.parameters()) == []
        ref = linears(model)[name]
        assert m.weight_int8.shape == ref.weight.shape
        if name != "lm_head":
            torch.testing.assert_close(m.bias, ref.bias)
    assert all(p.dtype != torch.int8 for p in q.parameters())
    floats = {n for n, _ in model.named_parameters() if n.startswith("wte.") or "norm" in n}
    assert {n for n, _ in q.named_parameters()} == floats                    # embedding and norm gains only
    # The count of parameters (and what depends on it) is the model's, quantized or not.
    assert q.num_params() == n_params and q.num_params(non_embedding=True) == model.num_params(non_embedding=True)
    assert q.flops_per_token(32) == model.flops_per_token(32) and f"params={n_params:,}" in repr(q)
    # Quantizing again changes nothing.
    before = {k: v.clone() for k, v in q.state_dict().items()}
    quantize_int8(q)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_weight_bytes_halve_versus_bf16():
    model = small_gpt(tie=False).cast_weights_(torch.bfloat16)
    before = weight_nbytes(model)
    q = quantize_int8(copy.deepcopy(model))
    after = weight_nbytes(q)
    lin = sum(m.weight.numel() for m in linears(model).values())
    channels = sum(m.weight.shape[0] for m in linears(model).values())
    assert before == 2 * model.num_params()
    assert after == before - lin + 2 * channels               # 2 -> 1 byte per weight, plus a bf16 scale per row
    for name, m in linears(q).items():
        assert m.weight_int8.nbytes * 2 == linears(model)[name].weight.nbytes
        assert m.scale.dtype == torch.bfloat16
    # In fp32 a quarter.
    model32 = small_gpt(tie=False)
    assert weight_nbytes(quantize_int8(copy.deepcopy(model32))) == weight_nbytes(model32) - 3 * lin + 4 * channels


def test_tied_head_gets_an_int8_copy_and_the_embedding_stays_float():
    model = small_gpt(tie=True)
    q = quantize_int8(copy.deepcopy(model))
    assert q.wte.weight.dtype == torch.float32 and torch.equal(q.wte.weight, model.wte.weight)
    assert isinstance(q.lm_head, Int8Linear)
    assert torch.equal(q.lm_head.weight_int8, quantize_weight(model.wte.weight)[0])
    # The copy costs vocab x n_embd int8 bytes (+ a scale per vocab row) on top of the float table.
    V, C = model.config.vocab_size, model.config.n_embd
    lin = sum(m.weight.numel() for n, m in linears(model).items() if n != "lm_head")
    ch = sum(m.weight.shape[0] for n, m in linears(model).items() if n != "lm_head")
    assert weight_nbytes(q) == weight_nbytes(model) - 3 * lin + 4 * ch + V * C + 4 * V
    # head=False: the head stays the embedding's float matrix.
    q2 = quantize_int8(copy.deepcopy(model), head=False)
    assert type(q2.lm_head) is nn.Linear and q2.lm_head.weight is q2.wte.weight
    assert all(isinstance(m, Int8Linear) for n, m in linears(q2).items() if n != "lm_head")


def test_autocast_and_bf16_weights_work():
    model = small_gpt()
    idx = torch.randint(0, 16, (2, 12))
    q = quantize_int8(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = model(idx)
        out, _ = q(idx)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05 * ref.abs().max().item(), rtol=0)
    assert q.generate(idx, 8, temperature=0, dtype=torch.bfloat16).shape == (2, 20)   # fp32 weights, autocast
    qb = quantize_int8(copy.deepcopy(model).cast_weights_(torch.bfloat16))            # how the sampler does it
    assert qb.wte.weight.dtype == torch.bfloat16
    assert qb.generate(idx, 8, temperature=0, dtype=torch.bfloat16).shape == (2, 20)
    assert qb.generate(idx, 8, temperature=0, use_cache=False, dtype=torch.bfloat16).shape == (2, 20)


def test_a_model_in_training_mode_is_refused():
    model = small_gpt().train()
    with pytest.raises(ConfigError, match=r"call model\.eval\(\)") as e:
        quantize_int8(model)
    assert "\n" not in str(e.value)
    assert all(type(m) is nn.Linear for m in linears(model).values())   # untouched


# -- the sampler CLI ------------------------------------------------------------------------
CHARS = "\n abcdefghijklmn"


@pytest.fixture
def ckpt(tmp_path):
    model = small_gpt(vocab=len(CHARS))
    path = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                "tokenizer": CharTokenizer(CHARS).to_dict()}, path)
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_quantize_int8(ckpt, dtype, capsys):
    base = ["--ckpt", ckpt, "--prompt", "abc", "--max-tokens", "12", "--device", "cpu", "--dtype", dtype,
            "--kernels", "torch", "--temperature", "0"]
    assert cli.main([*base, "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("abc") and len(out) == len("abc") + 12 + 1
    [line] = [ln for ln in err.splitlines() if ln.startswith("quantized")]
    m = re.search(r"weights ([\d.]+) MB \((\w+)\) -> ([\d.]+) MB", line)
    assert m and m.group(2) == dtype and float(m.group(3)) < float(m.group(1)), line
    assert cli.main([*base, "--quantize", "none"]) == 0
    assert "quantized" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--quantize", "int4"])
