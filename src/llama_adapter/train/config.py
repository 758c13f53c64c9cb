"""Training settings (typed, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("fp32", "bf16", "auto")
BASE_DTYPES = ("fp32", "bf16")
SHARDING = ("none", "fsdp")


@dataclass
class TrainConfig:
    """The `train` section of a recipe: schedule, batch, precision, checkpoints, devices and sharding."""

    out_dir: str = "runs/default"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # per process, per micro-batch
    grad_accum: int = 1
    lr: float | None = None  # absolute learning rate; when None: base_lr * effective batch / 256
    base_lr: float = 9e-3
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # overrides warmup_epochs
    warmup_epochs: float = 0.0
    clip_grad: float | None = 1.0
    precision: str = "fp32"  # "bf16": autocast, trainable parameters stay fp32; "auto": bf16 where native
    base_dtype: str = "fp32"  # "bf16": store the frozen base model in bf16
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    eval_every: int = 0  # steps between validations (0: only at the end)
    eval_batches: int | None = None  # cap on validation batches
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 1
    mix: dict[str, float] = field(default_factory=dict)  # data kind -> share of steps (joint training)
    resume: bool = True  # continue from the latest checkpoint in out_dir
    max_bad_steps: int = 10  # steps in a row with a non-finite loss or gradient (each skipped) before the run stops
    progress: bool = True
    # under torchrun: "fsdp" shards the frozen base's decoder blocks across the ranks (FSDP2); "none" replicates it
    shard: str = "none"
    activation_checkpointing: bool = False  # recompute each decoder block in backward: less memory, ~1/3 more compute
    # torch.compile the decoder blocks' forward and backward in training steps (train/compiled.py): true (the
    # first step waits for the graphs), false, or "auto": on one CPU process, compile once a few eager steps show
    # that the rest of the run saves more than the compile costs (`compile_pays_off`). A failure to compile warns
    # and trains eagerly.
    compile: bool | str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if self.shard not in SHARDING:
            raise ValueError(f"shard must be one of {SHARDING}, got {self.shard!r}")
        if not isinstance(self.compile, bool) and self.compile != "auto":
            raise ValueError(f"compile must be true, false or auto, got {self.compile!r}")
        for name in ("batch_size", "grad_accum", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if any(v < 0 for v in self.mix.values()) or (self.mix and sum(self.mix.values()) <= 0):
            raise ValueError(f"mix shares must be >= 0 and not all zero, got {self.mix}")

    def learning_rate(self, world_size: int = 1) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.batch_size * self.grad_accum * world_size / 256
