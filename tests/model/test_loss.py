"""cola_loss against a float64 numpy reference: values, accuracy and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cola_ray.model.loss import bilinear_logits, cola_loss, cosine_logits

B, P = 6, 5


def np_logits(za, zp, W, similarity, temperature):
    if similarity == "bilinear":
        return za @ W @ zp.T
    na = za / np.linalg.norm(za, axis=1, keepdims=True)
    npp = zp / np.linalg.norm(zp, axis=1, keepdims=True)
    return na @ npp.T / temperature


def np_loss_and_grads(za, zp, W):
    """Bilinear loss and its analytic gradients, float64: dL/ds = (softmax(s) - I) / B."""
    s = za @ W @ zp.T
    s_max = s.max(axis=1, keepdims=True)
    log_softmax = s - s_max - np.log(np.exp(s - s_max).sum(axis=1, keepdims=True))
    n = s.shape[0]
    loss = -np.mean(np.diag(log_softmax))
    ds = (np.exp(log_softmax) - np.eye(n)) / n
    return loss, ds @ zp @ W.T, ds.T @ za @ W, za.T @ ds @ zp


@pytest.fixture
def z():
    rng = np.random.default_rng(0)
    za = rng.normal(size=(B, P))
    zp = za + 1.0 * rng.normal(size=(B, P))  # correlated, so accuracy is neither 0 nor 1
    W = rng.normal(scale=0.5, size=(P, P))
    return za, zp, W


@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_loss_and_accuracy_match_numpy(z, similarity):
    za, zp, W = z
    s = np_logits(za, zp, W, similarity, 0.2)
    s_max = s.max(1, keepdims=True)
    log_softmax = s - s_max - np.log(np.exp(s - s_max).sum(1, keepdims=True))  # by hand
    ref_loss = -np.mean(np.diag(log_softmax))
    ref_acc = np.mean(s.argmax(1) == np.arange(B))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    loss, acc = cola_loss(t(za), t(zp), similarity=similarity, W=t(W), temperature=0.2)
    assert loss.dtype == torch.float32 and loss.shape == () and acc.shape == ()
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    assert acc.item() == pytest.approx(ref_acc)
    assert 0 < ref_acc < 1


def test_logit_helpers_shapes(z):
    za, zp, W = (torch.tensor(a) for a in z)
    assert bilinear_logits(za[:2], zp, W).shape == (2, B)
    torch.testing.assert_close(bilinear_logits(za, zp, W), za @ W @ zp.T)
    c = cosine_logits(za, zp, 0.5)
    assert c.shape == (B, B) and c.abs().max() <= 2.0 + 1e-9


def test_bilinear_gradients_match_numpy(z):
    za, zp, W = z
    ref_loss, gza, gzp, gW = np_loss_and_grads(za, zp, W)
    tza, tzp, tW = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in z)
    loss, _ = cola_loss(tza, tzp, similarity="bilinear", W=tW)
    loss.backward()
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(tza.grad.numpy(), gza, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tzp.grad.numpy(), gzp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tW.grad.numpy(), gW, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_gradients_match_finite_differences(z, similarity):
    za, zp, W = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in z)
    if similarity == "bilinear":
        fn = lambda a, p, w: cola_loss(a, p, similarity="bilinear", W=w)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (za, zp, W))
    else:
        fn = lambda a, p: cola_loss(a, p, similarity="cosine", temperature=0.2)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (za, zp))


def test_fp32_under_autocast(z):
    za, zp, W = (torch.tensor(a, dtype=torch.float32) for a in z)
    ref, _ = cola_loss(za, zp, similarity="bilinear", W=W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = cola_loss(za, zp, similarity="bilinear", W=W)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_bad_arguments(z):
    za, zp, W = (torch.tensor(a) for a in z)
    with pytest.raises(ValueError, match="W"):
        cola_loss(za, zp, similarity="bilinear")
    with pytest.raises(ValueError, match="similarity"):
        cola_loss(za, zp, similarity="dot", W=W)
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        cola_loss(za, zp[:3], similarity="cosine")


@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_same_clip_candidates_are_masked_by_hand(z, similarity):
    """Pairs 0 and 2 share a clip: row 0 loses candidate 2 and row 2 candidate 0, by hand."""
    za, zp, W = z
    ids = np.arange(B)
    ids[2] = ids[0]
    s = np_logits(za, zp, W, similarity, 0.2)
    allowed = ids[:, None] != ids[None, :]
    np.fill_diagonal(allowed, True)  # its own positive always stays
    s_masked = np.where(allowed, s, -np.inf)
    ref = -np.mean([s_masked[i, i] - np.log(np.exp(s_masked[i][allowed[i]]).sum()) for i in range(B)])
    ref_acc = np.mean(s_masked.argmax(1) == np.arange(B))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    loss, acc = cola_loss(t(za), t(zp), similarity=similarity, W=t(W), temperature=0.2,
                          clip_ids=torch.tensor(ids))
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)
    assert acc.item() == pytest.approx(ref_acc)
    # Distinct ids mask nothing: the paper's loss exactly.
    plain, _ = cola_loss(t(za), t(zp), similarity=similarity, W=t(W), temperature=0.2)
    distinct, _ = cola_loss(t(za), t(zp), similarity=similarity, W=t(W), temperature=0.2,
                            clip_ids=torch.arange(B))
    assert distinct.item() == plain.item() and abs(loss.item() - plain.item()) > 1e-6
    with pytest.raises(ValueError, match="clip_ids must be"):
        cola_loss(t(za), t(zp), similarity=similarity, W=t(W), clip_ids=torch.arange(B + 1))
