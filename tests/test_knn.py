"""The k-NN probe against a brute-force computation written out by hand."""

import math

import torch

from mae import create_mae
from mae.knn import knn_predict, pooled_features


def _brute_force(bank, labels, queries, num_classes, k, t):
    preds = []
    for q in queries.tolist():
        sims = []
        for b in bank.tolist():
            dot = sum(x * y for x, y in zip(q, b, strict=True))
            norm = math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))
            sims.append(dot / norm)
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(labels[i])] += math.exp(sims[i] / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


def test_knn_vote_equals_a_brute_force_computation():
    """Cosine similarity, the k most similar bank items vote exp(sim / T) for their class."""
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    for k, t in ((1, 0.07), (5, 0.1), (20, 1.0)):
        got = knn_predict(bank, labels, queries, 4, k=k, temperature=t, chunk=7)
        assert got.tolist() == _brute_force(bank, labels, queries, 4, k, t)


def test_knn_finds_the_class_of_copies_and_does_not_depend_on_the_chunk():
    g = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(40, 16, generator=g), torch.arange(40) % 5
    copies = bank * 3.0 + 1e-3 * torch.randn(40, 16, generator=g)  # cosine ignores the scale
    assert torch.equal(knn_predict(bank, labels, copies, 5, k=1), labels)
    full = knn_predict(bank, labels, copies, 5, k=10)
    assert torch.equal(knn_predict(bank, labels, copies, 5, k=10, chunk=3), full)


def test_pooled_features_average_the_patch_tokens_of_the_unmasked_encoder():
    model = create_mae("mae_vit_test").eval()
    imgs = torch.randn(3, 1, 16, 16)
    tokens = model.forward_features(imgs)
    torch.testing.assert_close(pooled_features(model, imgs), tokens[:, 1:].mean(1))
