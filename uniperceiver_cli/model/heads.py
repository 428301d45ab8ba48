"""The similarity head: every task scores a query against candidates by temperature-scaled cosine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.config import ModelConfig

# Learned temperatures, one per task family (the reference's names).
TEMPERATURES = ("img_cls", "video_cls", "text_mlm", "caption", "retrieve", "downstream")
MAX_LOGIT_SCALE = 100.0


class SimilarityHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.width
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.logit_scale = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(config.logit_scale_init)) for name in TEMPERATURES})
        classes = config.prompt.classifier_classes
        self.fc_prompt = nn.Linear(d, classes) if classes else None
        self.similarity_weight = nn.Parameter(torch.tensor(1.0)) if classes else None
        self._scale_init = config.logit_scale_init

    def reset_parameters(self) -> None:
        """Temperatures at 1/0.07; the classifier prompt starts at zero (it adds nothing at first)."""
        for scale in self.logit_scale.values():
            nn.init.constant_(scale, self._scale_init)
        if self.fc_prompt is not None:
            nn.init.zeros_(self.fc_prompt.weight)
            nn.init.zeros_(self.fc_prompt.bias)
            nn.init.ones_(self.similarity_weight)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence vectors (..., D) -> L2-normalised features after ln_post and proj."""
        return F.normalize(self.proj(self.ln_post(x)), dim=-1)

    def scale(self, task: str) -> torch.Tensor:
        """exp(logit_scale), replaced by 100 above 100 (no gradient reaches a capped scale)."""
        if task not in self.logit_scale:
            raise ValueError(f"unknown temperature {task!r}; choose one of: {', '.join(TEMPERATURES)}")
        return self.logit_scale[task].exp().clamp(max=MAX_LOGIT_SCALE)

    def logits(self, query: torch.Tensor, targets: torch.Tensor, task: str,
               classifier: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, D) and targets (C, D), both normalised -> (N, C). ``classifier`` adds the
        prompt-tuned linear classifier: similarity_weight * cosine logits + fc_prompt(query), where
        target c takes fc_prompt row ``rows[c]`` (default: row c, which needs C = classifier_classes)."""
        logits = query @ targets.t().to(query.dtype) * self.scale(task)
        if classifier and self.fc_prompt is not None:
            prompt = self.fc_prompt(query)
            if rows is not None:
                prompt = prompt[:, rows]
            if prompt.shape[-1] != logits.shape[-1]:
                raise ValueError(f"the classifier prompt scores its {self.fc_prompt.out_features} classes by "
                                 f"position; got {logits.shape[-1]} targets")
            logits = self.similarity_weight * logits + prompt
        return logits
