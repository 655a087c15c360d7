"""The k-NN probe of a frozen encoder: cosine similarity, the k nearest neighbours of each
query vote with weight exp(similarity / T) (Wu et al. 2018; DINO's k=20, T=0.07).

It needs no training, so pretraining can report it every few epochs: a curve of
representation quality while a long run goes on, and a way to compare mask ratios before
any fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae.model import MaskedAutoencoderViT


@torch.no_grad()
def pooled_features(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """imgs: (N, C, H, W) -> (N, D): the encoder on every patch, patch tokens averaged (the
    fine-tuned classifier's pooling)."""
    return model.forward_features(imgs)[:, 1:, :].mean(dim=1)


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """bank: (M, D), bank_labels: (M,), queries: (N, D) -> predicted labels (N,).

    Queries go in chunks of `chunk`, so memory stays at chunk x M similarities."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):
        sims, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)
