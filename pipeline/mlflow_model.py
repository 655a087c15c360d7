"""The classifier as an MLflow model: MLflow runs this file when it loads one (a "model from
code"), in `mlflow.pyfunc.load_model`, `mlflow models serve` and `mae-cli predict`.

Input: a DataFrame with a column `image` of encoded images (PNG, JPEG, anything Pillow
reads; base64 in a JSON request), of any size and mode. Output: per image the most likely
`class`, its `probability`, and `probabilities` of every class in the order of the model's
`classes` (its metadata). The preprocessing the classifier was evaluated with travels
inside: the mode (L or RGB), `mae.eval_transform` (resize, centre crop) and the training
shards' mean/std, all from the model's config.json.

It needs `mae` (bundled with the model), torch, torchvision, timm, safetensors, Pillow,
numpy and pandas; nothing of `pipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import torch

BATCH = 256  # images per forward pass


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from mae import MAEConfig, classifier_from_config, eval_transform

        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.model = classifier_from_config(config)
        self.model.load_state_dict(load_file(context.artifacts["weights"]), strict=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.classes = config["classes"]
        self.mode = "L" if config["channels"] == 1 else "RGB"
        size = MAEConfig.from_dict(config["model"]).image_hw[0]
        self.transform = eval_transform(size, config["mean"], config["std"])

    def _tensor(self, data: bytes) -> torch.Tensor:
        """An image file's bytes -> the tensor the classifier takes, decoded as training
        decoded the shards (`mae.images`: one rule per mode), then resized, cropped and
        normalised. ValueError, naming why, for what cannot be read."""
        from mae.images import decode

        return self.transform(decode(data, self.mode))

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = list(model_input["image"])
        probs = [torch.empty(0, len(self.classes))]
        for start in range(0, len(images), BATCH):
            batch = torch.stack([self._tensor(b) for b in images[start : start + BATCH]])
            logits = self.model(batch.to(self.device)).float().cpu()
            probs.append(logits.softmax(dim=1))
        p = torch.cat(probs)
        best = p.max(dim=1)
        return pd.DataFrame(
            {
                "class": [self.classes[i] for i in best.indices.tolist()],
                "probability": best.values.tolist(),
                "probabilities": p.tolist(),
            }
        )


mlflow.models.set_model(ImageClassifier())
