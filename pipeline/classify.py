"""What the downstream stages share: the pretrained encoder they start from, the saved
classifier format, and the one evaluation code path (training-time validation, the
evaluate stage and `mae-cli evaluate --run-id` all call `evaluate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mae import MAEConfig, build_classifier, build_linear_probe
from pipeline.distributed import Dist
from pipeline.errors import UserError
from pipeline.loader import manifest_digest


@dataclass(frozen=True)
class Pretrained:
    cfg: MAEConfig
    state: dict[str, torch.Tensor]
    run_id: str
    manifest_digest: str


def load_pretrained(folder: Path, shards: Path) -> Pretrained:
    """The pretrain stage's output, checked against the shards it will be used with."""
    files = [folder / n for n in ("config.json", "model.safetensors", "run_id")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"no pretrained model: {missing[0]} is missing (run `dvc repro pretrain`)")
    config = json.loads(files[0].read_text())
    digest = check_shards(config, shards, str(folder))
    return Pretrained(
        MAEConfig.from_dict(config["model"]),
        load_file(str(files[1])),
        files[2].read_text().strip(),
        digest,
    )


def check_shards(config: dict, shards: Path, what: str) -> str:
    """The shards' manifest digest; UserError naming `what` unless the saved model's
    `config` says it was trained on these very shards."""
    digest = manifest_digest(shards)
    if config["manifest_digest"] != digest:
        raise UserError(
            f"{what} was trained on other shards (manifest digest "
            f"{config['manifest_digest'][:12]}; {shards} has {digest[:12]})"
        )
    return digest


def classifier_config(
    kind: str, cfg: MAEConfig, manifest: dict, digest: str, global_pool: str
) -> dict:
    """What `build_from_config` needs to rebuild the classifier, saved as config.json."""
    return {
        "kind": kind,
        "model": cfg.to_dict(),
        "num_classes": len(manifest["classes"]),
        "classes": manifest["classes"],
        "global_pool": global_pool,
        "manifest_digest": digest,
    }


def build_from_config(config: dict) -> torch.nn.Module:
    cfg = MAEConfig.from_dict(config["model"])
    if config["kind"] == "linprobe":
        return build_linear_probe(cfg, config["num_classes"], global_pool=config["global_pool"])
    return build_classifier(cfg, config["num_classes"], drop_path_rate=0.0)


def save_classifier(
    folder: Path, model: torch.nn.Module, config: dict, state: dict[str, torch.Tensor] | None = None
) -> list[Path]:
    """Write model.safetensors (the given `state`, else the model's) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else model.state_dict()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [folder / "model.safetensors", folder / "config.json"]


def load_classifier(folder: Path) -> tuple[torch.nn.Module, dict]:
    config = json.loads((folder / "config.json").read_text())
    model = build_from_config(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval(), config


@torch.no_grad()
def encode_split(loader, encode, device: torch.device, dist: Dist = Dist()):
    """A split's features and labels: each rank encodes its share (`encode`: a batch of
    images on `device` -> (n, D)), and every rank gets them all. -> (features, labels)."""
    feats, labels = [], []
    for batch in loader:
        feats.append(encode(batch["image"].to(device, non_blocking=True)).float().cpu())
        labels.append(batch["label"])
    shares = dist.gather((torch.cat(feats), torch.cat(labels)))
    return torch.cat([f for f, _ in shares]), torch.cat([y for _, y in shares])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    autocast=None,
    dist: Dist = Dist(),
) -> dict:
    """Top-1, top-5, per-class accuracy and the confusion matrix (rows: true class).

    Under several ranks each evaluates its share of the split; the counts are summed."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = 0
    for batch in loader:
        imgs, labels = batch["image"].to(device, non_blocking=True), batch["label"]
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(imgs).float().cpu()
        k = min(5, num_classes)
        top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum().item()
        confusion += torch.bincount(
            labels * num_classes + logits.argmax(1), minlength=num_classes**2
        ).view(num_classes, num_classes)
    counts = dist.sum(torch.cat([confusion.flatten(), torch.tensor([top5])]))
    confusion, top5 = counts[:-1].view(num_classes, num_classes), int(counts[-1])
    total = int(confusion.sum())
    if total == 0:
        raise UserError("the evaluation split is empty")
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "top1": confusion.diag().sum().item() / total,
        "top5": top5 / total,
        "count": total,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
