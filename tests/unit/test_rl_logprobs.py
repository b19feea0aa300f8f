"""token_logprobs and entropy_from_logits: the same numbers (and gradients) as the naive
log_softmax + gather and as torch.distributions.Categorical, at any temperature and chunk size."""

import pytest
import torch
from torch.distributions import Categorical

from tulu.rl import entropy_from_logits, selected_logprobs, token_logprobs

B, T, V = 3, 7, 11


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_naive_log_softmax_gather_and_categorical(chunk_size, temperature):
    logits, tokens = _inputs()
    got = token_logprobs(logits, tokens, temperature, chunk_size=chunk_size)
    assert got.shape == (B, T - 1) and got.dtype == torch.float32
    naive = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, naive)
    cat = Categorical(logits=logits[:, :-1] / temperature).log_prob(tokens[:, 1:])
    torch.testing.assert_close(got, cat)


def test_token_logprobs_position_t_scores_the_next_token():
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = 0.0  # position 0 is certain of token 2
    logits[0, 1, 3] = 0.0  # position 1 is certain of token 3
    out = token_logprobs(logits, torch.tensor([[0, 2, 1]]))
    assert out[0, 0].item() == pytest.approx(0.0)  # tokens[1] == 2: certain
    assert out[0, 1].item() < -1e3  # tokens[2] == 1: impossible


@pytest.mark.parametrize("chunk_size", [5, 1024])  # several chunks; one chunk (no gradient copy)
@pytest.mark.parametrize("temperature", [0.8, 1.0])  # 1.0: the logits are used unscaled
def test_token_logprobs_gradient_matches_autograd_of_the_naive_version(chunk_size, temperature):
    logits, tokens = _inputs(1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    w = torch.randn(B, T - 1)
    (token_logprobs(a, tokens, temperature, chunk_size=chunk_size) * w).sum().backward()
    naive = torch.log_softmax(b[:, :-1] / temperature, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    (naive * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(a, b)  # the backward's buffers are its own, never the logits


def test_custom_backwards_pass_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: selected_logprobs(x, labels, 0.9, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: selected_logprobs(x, labels, 1.0, chunk_size=64), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, 1.3, chunk_size=4), (logits,))


def test_bf16_logits_are_computed_in_fp32():
    logits, tokens = _inputs(3, torch.bfloat16)
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, ref)
    a = logits.clone().requires_grad_(True)
    token_logprobs(a, tokens).sum().backward()
    assert a.grad.dtype == torch.bfloat16


def test_padding_labels_out_of_vocabulary_do_not_crash():
    logits, tokens = _inputs()
    tokens[:, -2:] = -100
    assert torch.isfinite(token_logprobs(logits, tokens)).all()


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_entropy_matches_categorical_entropy(temperature):
    logits, _ = _inputs(4)
    got = entropy_from_logits(logits, temperature, chunk_size=5)
    assert got.shape == (B, T)
    torch.testing.assert_close(got, Categorical(logits=logits / temperature).entropy())


def test_entropy_gradient_matches_autograd_and_survives_masked_vocabulary():
    logits, _ = _inputs(5)
    logits[..., -3:] = float("-inf")  # e.g. padded vocabulary entries
    a = logits.clone().requires_grad_(True)
    b = logits[..., :-3].clone().requires_grad_(True)
    w = torch.randn(B, T)
    got = entropy_from_logits(a, chunk_size=4)
    torch.testing.assert_close(got, Categorical(logits=b.detach()).entropy())
    (got * w).sum().backward()
    (Categorical(logits=b).entropy() * w).sum().backward()
    assert torch.isfinite(a.grad).all() and (a.grad[..., -3:] == 0).all()
    torch.testing.assert_close(a.grad[..., :-3], b.grad)


def test_non_positive_temperature_is_refused():
    logits, tokens = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, temperature=0.0)
