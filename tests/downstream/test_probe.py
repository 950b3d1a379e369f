"""The linear probe without Ray: clip-level evaluation by hand, training on a separable toy set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cola_ray.downstream.probe import clip_logits, evaluate, train_probe


def identity_layer(n: int) -> nn.Linear:
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
    return layer


def hand_example() -> dict[str, np.ndarray]:
    """Three test clips and one train clip; with an identity layer, logits = h."""
    rows = [  # (clip, label index, split, h = logits)
        ("c0", 0, "test", [10.0, 0.0, 0.0]),  # one very confident segment for class a ...
        ("c0", 0, "test", [0.0, 4.0, 0.0]),   # ... two fairly confident ones for class b
        ("c0", 0, "test", [0.0, 4.0, 0.0]),
        ("c1", 1, "test", [0.0, 2.0, 1.0]),
        ("c2", 2, "test", [1.0, 0.0, 0.0]),
        ("c2", 2, "test", [0.0, 0.0, 0.5]),
        ("c3", 0, "train", [0.0, 0.0, 9.0]),  # another split: must not count
    ]
    clip = np.array([r[0] for r in rows])
    return {
        "h": np.array([r[3] for r in rows], dtype=np.float32),
        "clip": clip,
        "clip_index": np.unique(clip, return_inverse=True)[1],
        "label_index": np.array([r[1] for r in rows]),
        "split": np.array([r[2] for r in rows]),
        "classes": np.array(["a", "b", "c"]),
    }


def test_clip_logits_average_each_clips_segments():
    logits = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    clips, mean = clip_logits(logits, np.array([7, 7, 2]))
    assert clips.tolist() == [2, 7]
    np.testing.assert_allclose(mean, [[0.0, 5.0], [2.0, 1.0]])


def test_evaluate_averages_logits_not_probabilities():
    emb = hand_example()
    result = evaluate(identity_layer(3), emb, "test")
    # By hand: c0 mean logits (10, 8, 0) / 3 = (3.33, 2.67, 0) -> a (right);
    # c1 (0, 2, 1) -> b (right); c2 (0.5, 0, 0.25) -> a (wrong, it is c).
    assert result["n_clips"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert result["confusion"].tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    mean = np.array([[10 / 3, 8 / 3, 0.0], [0.0, 2.0, 1.0], [0.5, 0.0, 0.25]])
    log_p = mean - np.log(np.exp(mean).sum(axis=1, keepdims=True))
    assert result["loss"] == pytest.approx(-(log_p[0, 0] + log_p[1, 1] + log_p[2, 2]) / 3)

    # Averaging probabilities instead would call c0 a "b": softmax(10, 0, 0) is ~(1, 0, 0)
    # but counts once, softmax(0, 4, 0) = (0.018, 0.965, 0.018) counts twice -> (0.35, 0.64, 0.01).
    h, test = emb["h"], emb["split"] == "test"
    p = np.exp(h[test]) / np.exp(h[test]).sum(axis=1, keepdims=True)
    _, mean_p = clip_logits(p, emb["clip_index"][test])
    assert mean_p.argmax(axis=1).tolist() == [1, 1, 0]  # prob averaging: 1 of 3 right
    assert np.mean(mean_p.argmax(axis=1) == [0, 1, 2]) == pytest.approx(1 / 3) != result["accuracy"]


def test_evaluate_skips_unknown_labels_and_empty_splits():
    emb = hand_example()
    emb["label_index"] = emb["label_index"].copy()
    emb["label_index"][3] = -1  # c1 has a label outside the classes
    result = evaluate(identity_layer(3), emb, "test")
    assert result["n_clips"] == 2 and result["accuracy"] == pytest.approx(0.5)
    assert "b" not in result["per_class"]
    empty = evaluate(identity_layer(3), emb, "validation")
    assert empty["n_clips"] == 0 and math.isnan(empty["accuracy"])


def toy_embeddings(n_per_class=(12, 4, 4), segments=3, dim=16, n_classes=3, seed=0) -> dict[str, np.ndarray]:
    """Gaussian clusters, one centre per class; every clip has ``segments`` noisy segments."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim)) * 3
    rows = []
    for split, n in zip(("train", "validation", "test"), n_per_class):
        for c in range(n_classes):
            for k in range(n):
                for s in range(segments):
                    rows.append((f"{split}-{c}-{k}", c, split, centres[c] + rng.normal(0, 1.0, dim)))
    clip = np.array([r[0] for r in rows])
    emb = {
        "h": np.array([r[3] for r in rows], dtype=np.float32),
        "clip": clip,
        "clip_index": np.unique(clip, return_inverse=True)[1],
        "label_index": np.array([r[1] for r in rows]),
        "split": np.array([r[2] for r in rows]),
        "classes": np.array(["x", "y", "z"]),
    }
    for v in emb.values():  # as they arrive from Ray's object store
        v.setflags(write=False)
    return emb


def test_probe_learns_a_separable_toy_set_deterministically():
    emb = toy_embeddings()
    seen = []
    layer, history = train_probe(emb, lr=1e-2, epochs=30, batch_size=8, seed=3, on_epoch=seen.append)
    assert len(history) == 30 and seen == history
    assert {"epoch", "train_loss", "train_accuracy", "val_accuracy", "val_loss"} <= history[-1].keys()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] == 1.0
    assert evaluate(layer, emb, "test")["accuracy"] == 1.0

    again, _ = train_probe(emb, lr=1e-2, epochs=30, batch_size=8, seed=3)
    torch.testing.assert_close(again.weight, layer.weight, rtol=0, atol=0)
    other, _ = train_probe(emb, lr=1e-2, epochs=30, batch_size=8, seed=4)
    assert not torch.equal(other.weight, layer.weight)


def test_probe_trains_on_one_segment_per_clip_per_epoch(monkeypatch):
    # 15 train clips of 3 segments: an epoch is 15 examples (one random crop per clip, as
    # the paper), not the 45 segments of the grid.
    emb = toy_embeddings(n_per_class=(5, 1, 1), segments=3)
    counts = []
    original = torch.nn.functional.cross_entropy

    def counting(logits, target, *a, **k):
        counts.append(target.shape[0])
        return original(logits, target, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", counting)
    train_probe(emb, epochs=4, batch_size=64, seed=0)
    assert counts == [15] * 4  # one batch of 15 per epoch


def test_probe_needs_a_train_split():
    emb = dict(toy_embeddings())
    emb["split"] = np.where(emb["split"] == "train", "validation", emb["split"])
    with pytest.raises(ValueError, match="train split"):
        train_probe(emb, epochs=1)


def test_standardized_probe_takes_raw_embeddings_and_copes_with_badly_scaled_dimensions():
    """Embeddings whose informative dimensions are tiny next to a huge constant offset (as
    unnormalised log-mel statistics or max-pooled activations): the raw probe at the paper's
    rate cannot use them; z-scored, the same layer separates them, and the
    folded layer takes the raw embeddings."""
    emb = dict(toy_embeddings(seed=1))
    h = np.array(emb["h"]) * 1e-3 + 1e3  # informative part 1000x below a common offset
    emb["h"] = h.astype(np.float32)
    raw, _ = train_probe(emb, lr=1e-2, epochs=30, batch_size=8, seed=0)
    std, _ = train_probe(emb, lr=1e-2, epochs=30, batch_size=8, seed=0, standardize=True)
    assert evaluate(std, emb, "test")["accuracy"] == 1.0
    assert evaluate(raw, emb, "test")["accuracy"] < 0.7
    # The fold: the returned layer on raw h equals a layer on z-scored h.
    from cola_ray.downstream.probe import _fold

    layer = nn.Linear(h.shape[1], 3)
    mean, sd = torch.randn(h.shape[1]), torch.rand(h.shape[1]) + 0.5
    x = torch.randn(5, h.shape[1])
    torch.testing.assert_close(_fold(layer, mean, sd)(x), layer((x - mean) / sd))


def test_mean_pooling_gives_one_row_per_clip_the_mean_of_its_segments():
    from cola_ray.downstream.probe import pool

    emb = hand_example()
    pooled = pool(emb, "mean")
    assert list(pooled["clip"]) == ["c0", "c1", "c2", "c3"] and list(pooled["clip_index"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(pooled["h"][0], np.mean(emb["h"][:3], axis=0), rtol=1e-6)
    np.testing.assert_allclose(pooled["h"][2], np.mean(emb["h"][4:6], axis=0), rtol=1e-6)
    assert list(pooled["label_index"]) == [0, 1, 2, 0] and list(pooled["split"]) == ["test"] * 3 + ["train"]
    # Pooled embeddings, identity layer: c0's mean is (3.3, 2.7, 0) -> class a, where averaged
    # logits say the same; c2's mean (0.5, 0, 0.25) -> a, wrong (its label is c).
    assert evaluate(identity_layer(3), pooled, "test")["accuracy"] == pytest.approx(2 / 3)
    assert pool(emb, "logits").keys() == emb.keys()
    with pytest.raises(ValueError, match="pooling"):
        pool(emb, "max")
