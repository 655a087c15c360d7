"""What the classifier stages (finetune, its scratch control, linprobe) share: the encoder
they start from, the val split their kept epoch is chosen on, the params they inherit from
the pretrain run (their MLflow parent), and their outputs: the kept classifier and its
curve."""

from __future__ import annotations

import functools
import io
import logging
import time
from pathlib import Path

from pipeline import reports, settings, tracking
from pipeline.artifacts import Pretrained, load_pretrained, save_classifier
from pipeline.data.labels import SPLITS as LABEL_SPLITS
from pipeline.data.labels import label_subset
from pipeline.data.store import shard_store
from pipeline.errors import UserError, first_line
from pipeline.params import Params, flatten
from pipeline.train.loop import speed
from pipeline.train.runtime import Runtime, runtime_key, seed_everything
from pipeline.train.stage import Stage

log = logging.getLogger(__name__)


class Downstream(Stage):
    """Subclasses write the build steps, set `config` and implement `fit` (one epoch's
    training -> its summary) and `validate` (-> val top-1)."""

    config: dict  # the saved classifier's config.json
    unpaired = "(random init)"  # a run name's head without a pretrain run (scratch)

    def __init__(self, p: Params, rt: Runtime) -> None:
        super().__init__(p, rt)
        self.pre = pre = self.encoder(p)
        seed_everything(p.runtime.seed)
        shards = shard_store(p.data)
        self.manifest = shards.manifest()
        self.digest, self.parent_id = pre.manifest_digest, pre.run_id
        self.num_classes = len(self.manifest["classes"])
        self.labels = label_subset(
            self._split_labels(shards) if p.data.labels is not None else {},
            self.manifest["classes"],
            p.data.labels,
            p.data.labels_seed,
        )
        if not self.manifest["splits"]["val"]["count"]:
            raise UserError(
                "the val split is empty: the kept model is chosen on it "
                "(set data.val_fraction above 0)"
            )
        self.val_loader = self.loader_for("val", "eval", 512, pre.cfg.image_hw[0])

    def _split_labels(self, shards) -> dict:
        """Each train and val sample's class, by id (the shards' indexes: no image read)."""
        return {
            split: shards.index(self.manifest["splits"][split]["shards"]).label
            for split in LABEL_SPLITS
        }

    def loader_for(self, split: str, augmentation: str, batch_size: int, img_size: int, **kw):
        """`Stage.loader_for`, over the label subset of `split` where one is set."""
        ids = self.labels.ids.get(split) if self.labels is not None else None
        return super().loader_for(split, augmentation, batch_size, img_size, subset=ids, **kw)

    def train_count(self) -> int:
        if self.labels is not None:
            return len(self.labels.ids["train"])
        return self.manifest["splits"]["train"]["count"]

    def encoder(self, p: Params) -> Pretrained:
        """Where the encoder starts: the pretrain stage's output."""
        return load_pretrained(Path(p.paths.models) / "pretrain", shard_store(p.data))

    def fit(self, epoch: int, run) -> dict:
        raise NotImplementedError

    def validate(self) -> float:
        raise NotImplementedError

    def derived_params(self) -> dict:
        return {}

    def label_key(self) -> dict | None:
        """The label subset as the checkpoint key and the runs name it (None: every label)."""
        if self.labels is None:
            return None
        return {"labels": self.labels.spec, "seed": self.labels.seed, "digest": self.labels.digest}

    def own_params(self) -> dict:
        """The stage's section as it reads it (the pixels control drops what it ignores)."""
        return flatten(self.given)

    def key(self) -> dict:
        return {
            self.name: self.own_params(),
            "data.labels": self.label_key(),
            "runtime": runtime_key(self.p.runtime, self.rt),
            "model": self.pre.cfg.to_dict(),
            "pretrain.run_id": self.pre.run_id,
            "data.manifest_digest": self.digest,
            "world_size": self.rt.dist.world_size,
        }

    @functools.cached_property
    def inherited(self) -> dict:
        """The pretrain run's data, model and pretrain params, so either run compares mask
        ratios; from a random init, the model's config alone."""
        if self.pre.run_id is None:
            model = {f"model.{k}": v for k, v in self.pre.cfg.to_dict().items()}
            return {"model.name": self.p.model.name, **model}
        parent = tracking.active_run(self.pre.run_id, f"the {self.name} run's parent pretrain")
        prefixes = ("pretrain.", "model.", "data.")
        return {k: v for k, v in parent.data.params.items() if k.startswith(prefixes)}

    def run_name(self) -> str:
        """`<stage> mask=<the pretrain run's ratio>` (`(random init)` for scratch) and what
        else differs from the committed params.yaml: its own section as it ran, and what
        the pretrain run inherited from (data, model, pretrain)."""
        ratio, p, own = self.inherited.get("pretrain.mask_ratio"), self.p, self.section_name
        now = {**flatten(p.data, "data."), "model.name": p.model.name}
        if ratio is not None:  # from a pretrain run: what it ran with (scratch: the encoder)
            now |= flatten(p.model, "model.") | flatten(p.pretrain, "pretrain.")
        head = f"{self.name} mask={ratio}" if ratio is not None else f"{self.name} {self.unpaired}"
        return settings.run_name(head, now | flatten(self.given, f"{own}."), own)

    def run_params(self) -> dict:
        return {
            **self.inherited,
            **{f"{self.name}.{k}": v for k, v in self.own_params().items()},
            **{f"runtime.{k}": v for k, v in flatten(self.p.runtime).items()},
            **self.derived_params(),
            **self.label_params(),
            "data.train_in_memory": self.loader.in_memory,  # what data.in_memory resolved to
            "pretrain.run_id": self.pre.run_id or "none (random init)",
        }

    def label_params(self) -> dict:
        """The run's own label key and counts (never its parent's: pretraining ignores the
        key), and the schedule it trained with (`Stage.schedule_for`)."""
        counts = self.labels.counts() if self.labels is not None else {
            split: self.manifest["splits"][split]["count"] for split in LABEL_SPLITS
        }  # fmt: skip
        return {
            "data.labels": self.p.data.labels,
            "data.labels_seed": self.p.data.labels_seed,
            "labels.digest": self.labels.digest if self.labels is not None else "all",
            **{f"labels.{split}_count": n for split, n in counts.items()},
            f"{self.name}.run_epochs": self.section.epochs,
            f"{self.name}.run_batch_size": self.section.batch_size,
        }

    def train_epoch(self, epoch: int, run) -> dict:
        return self.fit(epoch, run) | {"val_top1": self.validate()}

    def write_outputs(self, run, out: Path, plots: Path) -> dict:
        save_classifier(out, self.model, self.config, self.best["state"])
        if self.labels is not None:  # the subset's keys, beside the model (and in MLflow)
            keys = {
                "train": self.loader.reader.index.key[self.labels.ids["train"]].tolist(),
                "val": self.val_loader.reader.index.key[self.labels.ids["val"]].tolist(),
            }
            self.labels.write(out / "labels.json", self.manifest["classes"], keys)
        start = time.perf_counter()
        run.log_classifier(out, self.example_image())
        model_log_seconds = time.perf_counter() - start
        epochs = self.history.epochs
        curve = [{k: e[k] for k in ("epoch", "loss", "val_top1")} for e in epochs]
        reports.write_curve(plots / "curve.csv", curve)
        reports.plot_curve(plots / "curve.png", curve, "epoch", ["loss", "val_top1"], run.id)
        run.log_file(plots / "curve.png", "plots")
        return {
            "val_top1": self.best["top1"],
            "best_epoch": self.best["epoch"],
            "train_loss": epochs[-1]["loss"],
            **speed(epochs),
            "model_log_seconds": model_log_seconds,
        }

    def example_image(self) -> bytes | None:
        """The MLflow model's input example: the first val image decoded as the model
        decodes it (`mae.images.decode`), as PNG; None, with a warning, when there is
        none to make (an empty val split): the model is logged without one. A CMYK JPEG,
        saved as PNG as stored, failed every finished run, and again on each resume."""
        from mae.images import decode

        try:
            img = decode(self.val_loader.reader.encoded(0), self.val_loader.reader.mode)
            png = io.BytesIO()
            img.save(png, format="PNG")
        except Exception as err:  # an example is a convenience: never worth a finished run
            log.warning("the MLflow model gets no input example: %s", first_line(err))
            return None
        return png.getvalue()
