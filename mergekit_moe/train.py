"""Train one expert: a PEFT LoRA on one base model and one task dataset.

``TrainConfig`` is also the schema of a recipe's ``train:`` block (recipe.py validates keys
against ``dataclasses.fields(TrainConfig)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: fields that only change how a run is observed or saved, not the adapter it produces
_NON_RESULT_FIELDS = frozenset({"eval_every", "save_every", "keep_checkpoints"})
#: fields that name data files; the data *fingerprint* (content hash) replaces them in comparisons
_DATA_FIELDS = frozenset({"data", "validation_data"})


@dataclass
class TrainConfig:
    """Hyperparameters of one expert's training run (also a recipe's ``train:`` block)."""

    data: str                                  # task data file (JSONL/JSON/CSV/Parquet) or a directory with train.jsonl
    validation_data: str | None = None         # explicit validation file; else carved out of ``data``
    task: str | None = None                    # task label (defaults to the expert's task)
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None    # None: per-architecture defaults (arch.default_target_modules)
    use_rslora: bool = False
    max_steps: int | None = None               # optimizer steps; overrides ``epochs`` when set
    epochs: float = 1
    lr: float = 2e-4
    batch_size: int = 8                        # global batch per optimizer micro-step (split across DDP ranks)
    grad_accum: int = 1
    max_length: int = 256                      # tokens per example (prompt + response); longer rows are cut
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50                       # optimizer steps between validation-loss evaluations (0: only at the end)
    save_every: int = 50                       # optimizer steps between checkpoints (0: never)
    keep_checkpoints: int = 2                  # complete checkpoints kept on disk
    val_fraction: float = 0.1                  # share of ``data`` held out when ``validation_data`` is not given
    dtype: str = "auto"                        # auto | float32 | bfloat16 (auto: bf16 on GPUs that support it, else fp32)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that decide the trained adapter (what ``expert.json`` records and resume/skip compare)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NON_RESULT_FIELDS | _DATA_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            from .errors import TrainError

            raise TrainError(f"unknown train setting(s): {', '.join(unknown)}", hint=f"known: {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class TrainResult:
    """What a finished (or skipped) training run produced."""

    name: str
    bundle_dir: str | None                      # where the bundle was written (registry store or out_dir)
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    skipped: bool = False                       # True when the registry already held an identical expert
    registry_ref: str | None = None
    loss_curve: str | None = None
