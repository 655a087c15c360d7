"""The scratch stage, the control of every run: the finetune stage's classifier, params
(`finetune.*`) and budget, from a randomly initialised encoder instead of the pretrained
one. `mae_gain` (evaluate) is finetune's test top-1 minus this stage's.

The random encoder is the MAE's own initialisation (xavier linears, fixed sin-cos position
embeddings, normal(0.02) tokens), so pretraining is the only difference. The stage reads
neither the pretrained model nor the `pretrain` params: a mask-ratio sweep reuses it from
DVC's cache, and its MLflow run is one of its own, which every pretrain run it controls
names (tag `scratch.run_id`, metrics `scratch/test_top1` and `mae_gain`)."""

from __future__ import annotations

from pipeline.artifacts import Pretrained
from pipeline.data.store import shard_store
from pipeline.params import Params
from pipeline.stages.finetune import Finetuner
from pipeline.stages.pretrain import build_model
from pipeline.train.runtime import Runtime, seed_everything


class ScratchFinetuner(Finetuner):
    name = "scratch"
    section_name = "finetune"

    def __init__(self, p: Params, rt: Runtime) -> None:
        super().__init__(p, rt)
        # every block trains, whatever finetune.trainable_blocks says: partially fine-tuning
        # a random encoder measures little, and one control serves every setting of it
        self.section = p.finetune.model_copy(update={"trainable_blocks": None})

    def encoder(self, p: Params) -> Pretrained:
        shards = shard_store(p.data)
        seed_everything(p.runtime.seed)  # the pretrain stage's initial weights, exactly
        model = build_model(p, shards.manifest(), decoder=False)  # model.decoder_*: no rerun
        return Pretrained(model.cfg, model.state_dict(), None, shards.digest())
