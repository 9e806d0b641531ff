"""The fused head + loss in the model: the auto decision, forward's results, and training with it on
and off from the same seed."""
import pytest
import torch

from gpt import create_model
from gpt.ops import resolve_fused_loss
from kernels import reference

TINY = dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=16)


def test_auto_is_on_for_large_vocabularies_only():
    assert resolve_fused_loss("auto", 50257, 512)          # small preset with GPT-2's vocabulary
    assert not resolve_fused_loss("auto", 65, 384)          # char models keep their numerics
    assert not resolve_fused_loss("auto", 8192, 384)        # the default BPE
    assert resolve_fused_loss("on", 65, 384) and not resolve_fused_loss("off", 50257, 512)
    with pytest.raises(Exception, match="fused_loss"):
        resolve_fused_loss("yes", 65, 32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_fused_equals_unfused(reduction):
    model = create_model("tiny", kernels="torch", vocab_size=300, fused_loss="off", **TINY)
    idx = torch.randint(0, 300, (3, 16))
    y = idx.roll(-1, 1)
    y[0, :5] = -1
    logits, ref = model(idx, y, reduction=reduction)
    assert logits.shape == (3, 16, 300) and not model.fused_loss_in_use()
    none, loss = model.use_fused_loss("on")(idx, y, reduction=reduction)
    assert none is None and model.fused_loss_in_use() and "fused_loss=on -> on" in repr(model)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=2e-6)


def test_training_with_fused_loss_on_and_off_gives_the_same_losses():
    """AdamW steps in float32 from one seed (tied embeddings: the weight's gradient sums head and embedding):
    the losses agree to float32 rounding, ~1e-6 relative after a few steps."""
    losses = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = create_model("tiny", kernels="torch", vocab_size=500, fused_loss=mode, **TINY)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(5):
            idx = torch.randint(0, 500, (4, 17), generator=gen)
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[mode] = torch.tensor(out)
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-5, atol=0)


def test_bf16_autocast_fused_matches_unfused():
    model = create_model("tiny", kernels="torch", vocab_size=300, fused_loss="off", **TINY)
    idx = torch.randint(0, 300, (2, 16))
    with torch.autocast("cpu", torch.bfloat16):
        _, ref = model(idx, idx)
        _, loss = model.use_fused_loss("on")(idx, idx)
    # the same bf16 logits; the loss differs only by the fp32 softmax's summation order
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_fused_and_unfused_match_the_reference(reduction):
    """z_loss adds z * lse^2 per scored position: both paths equal the float64 reference on the model's own
    hidden states, and every parameter gets the same gradient from either."""
    model = create_model("tiny", kernels="torch", vocab_size=300, fused_loss="off", **TINY)
    idx = torch.randint(0, 300, (3, 16))
    y = idx.roll(-1, 1)
    y[0, :5] = -1
    with torch.no_grad():
        h = model.hidden_states(idx).double().reshape(-1, 32)
    want = reference.linear_cross_entropy(h, model.lm_head.weight.double(), y.reshape(-1), reduction=reduction,
                                          z_loss=0.1)
    _, plain = model(idx, y, reduction=reduction)
    grads = {}
    for mode in ("off", "on"):
        model.zero_grad()
        _, loss = model.use_fused_loss(mode)(idx, y, reduction=reduction, z_loss=0.1)
        loss.sum().backward()
        torch.testing.assert_close(loss.double(), want.view(loss.shape), rtol=1e-5, atol=1e-5)
        assert (loss.detach() - plain.detach()).abs().max() > 1.0  # lse ~ log(300): the term is ~3.3 per position
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for on, off in zip(grads["on"], grads["off"]):
        torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-6)
