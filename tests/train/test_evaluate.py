import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from train.evaluate import split_loss


@pytest.mark.parametrize("length", [97, 16 * 6 + 1])  # a shorter last window, and none
def test_split_loss_scores_every_token_once_with_its_window_context(length):
    torch.manual_seed(0)
    T = 16
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=T, vocab_size=20)).eval()
    tokens = np.random.default_rng(0).integers(0, 20, length).astype(np.uint16)
    loss, n = split_loss(model, tokens, batch_size=4, device=torch.device("cpu"), dtype=torch.float32)
    assert n == length - 1
    # Brute force: token j is predicted from the tokens since the start of its window of T.
    data = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        ref = [F.cross_entropy(model(data[(j - 1) // T * T:j][None])[0][0, -1], data[j]) for j in range(1, length)]
    # fp32 both ways, summed in another order: a few ulps of the ~3-nat mean.
    assert loss == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
