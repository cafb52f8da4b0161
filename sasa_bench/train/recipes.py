"""Training recipes: every hyperparameter in one dataclass, two named presets, config files.

Resolution order (later wins): the recipe's values -> a ``--config`` file (TOML or YAML, the
same keys as :class:`TrainConfig`, plus an optional ``model`` table of ModelSpec overrides) ->
the flags given on the command line. The resolved config is saved in the run directory.

``paper`` is the paper's ImageNet appendix. What the paper does not state, and our choice:

- weight decay 1e-4 (the standard ResNet value), not applied to BatchNorm parameters and biases
  (as TF's TPU ResNet reference, the paper's likely starting point, does);
- label smoothing 0.1 (standard in Google's ImageNet recipes of the time);
- momentum 0.9 (Nesterov, as stated);
- no dropout (the models have none);
- augmentation: Inception-style RandomResizedCrop + horizontal flip; eval resize to 256/224 of
  the input then center crop;
- LR warm-up linear from ~0 to the peak over 10 epochs, then cosine to 0, stepped per iteration;
- "batch norm decay 0.9999" is TF's convention (running = decay*running + (1-decay)*batch), i.e.
  PyTorch ``momentum = 1e-4``;
- EMA decay 0.9999 with TF's ``num_updates`` warm-up: decay_t = min(decay, (1+t)/(10+t)); the
  EMA weights (and BN buffers) are what gets evaluated.

``short`` is for this project's CPU machine: sasa_resnet26 / resnet26 on Fashion-MNIST at 64x64
(16x16 maps at the first attention group, larger than k = 11) in a few minutes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from sasa_bench.choices import Precision
from sasa_bench.errors import SasaError, check_types
from sasa_bench.hardware import PRECISION_CHOICES as PRECISIONS

_T, _R, _S = "Training", "Run control", "Speed"


def _f(default: Any, help: str, panel: str = _T, cli: bool = True, choices: Any = None) -> Any:
    """A TrainConfig field with what its generated ``train`` flag says (see cli/options.py);
    ``choices``: the field's :class:`~sasa_bench.choices.Choice` set (the flag validates it)."""
    return field(default=default, metadata={"help": help, "panel": panel, "cli": cli, "choices": choices})


@dataclass
class TrainConfig:
    """Every training hyperparameter. ``lr=None`` means ``lr_base * batch_size / lr_ref_batch``.

    Each field's metadata (help, panel) is what its ``sasa-bench train`` flag shows: the flags are
    generated from these fields (``cli/options.py::train_options``), so a new setting is one line.
    """

    recipe: str = _f("paper", "The recipe (paper | short).", cli=False)
    # data
    data: str = _f("imagenet", "imagenet | fashion-mnist | synthetic; detection: coco. (recipe: paper=imagenet, short=fashion-mnist)")
    data_dir: str | None = _f(None, "Dataset root (imagenet: ROOT/train, ROOT/val; fashion-mnist: the IDX files; coco: ROOT/train2017, ROOT/val2017, ROOT/annotations).")
    holdout: bool = _f(False, "Evaluate on a 4% held-out split of ImageNet train (fixed), as Tables 3 and 5.")
    augment: bool = _f(True, "Training augmentation (random crop + flip). (recipe: paper=on, short=off)")
    synthetic_train: int = _f(2048, "--data synthetic: training images.")
    synthetic_eval: int = _f(512, "--data synthetic: eval images.")
    train_images: int | None = _f(None, "Train on a fixed random subset of this many images (the same for every seed). (default: all; short: 10000)")
    eval_images: int | None = _f(None, "Evaluate on a fixed random subset of this many images. (default: all; short: 5000)")
    workers: int = _f(4, "DataLoader worker processes (ImageFolder).", _S)
    threads: int | None = _f(None, "torch CPU threads per process. (default: torch's)", _S)
    # schedule
    epochs: float = _f(130, "Epochs (the schedule's length).")
    max_steps: int | None = _f(None, "Stop after this many steps without changing the schedule.", _R)
    batch_size: int = _f(4096, "Global batch size: split over torchrun processes and --grad-accum-steps; the LR scales with it.")
    grad_accum_steps: int | None = _f(None, "Gradient accumulation: each step runs the batch as N micro-batches of batch/N/processes. (default: 1)")
    lr: float | None = _f(None, "Peak LR. (default: lr-base x batch / lr-ref-batch, paper: 1.6 x batch/4096)")
    lr_base: float = _f(1.6, "LR at --lr-ref-batch (the linear scaling rule's base).")
    lr_ref_batch: int = _f(4096, "The batch --lr-base is given for.")
    warmup_epochs: float = _f(10, "Linear warm-up epochs before the cosine decay.")
    schedule: str = _f("cosine", "LR after the warm-up: cosine | constant.")
    # optimiser
    optimizer: str = _f("sgd", "Optimiser (sgd).")
    momentum: float = _f(0.9, "SGD (Nesterov) momentum.")
    nesterov: bool = _f(True, "Nesterov momentum.")
    weight_decay: float = _f(1e-4, "Weight decay (not on BN/bias unless --decay-norm-and-bias).")
    decay_norm_and_bias: bool = _f(False, "Apply weight decay to BN parameters and biases too.")
    label_smoothing: float = _f(0.1, "Label smoothing.")
    grad_clip: float | None = _f(None, "Clip the gradient norm to this (0 = off).")
    zero_init_residual: bool = _f(False, "Start each residual block's last BN at gamma = 0 (torchvision's flag).")
    # model statistics
    ema_decay: float = _f(0.9999, "EMA decay of the weights (0 = off; evaluated when on).")
    bn_momentum: float | None = _f(1e-4, "BatchNorm momentum, PyTorch convention (paper: 1e-4 = TF decay 0.9999).")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (CUDA).")
    # speed
    precision: str = _f("fp32", "Autocast precision (fp16 with a grad scaler); auto = bf16 where native.", _S, choices=Precision)
    channels_last: bool = _f(False, "Channels-last memory format.", _S)
    compile: bool = _f(False, "torch.compile the model.", _S)
    # run control
    seed: int = _f(0, "Seed (init, data order, augmentation).", _R)
    deterministic: bool = _f(False, "Deterministic algorithms (bit-exact resume on CPU).", _R)
    eval_every: int = _f(1, "Evaluate every N epochs (and at the end).", _R)
    eval_batch_size: int | None = _f(None, "Eval batch size per process. (default: the training batch per process)", _R)
    checkpoint_every: int | None = _f(None, "Also checkpoint every N steps (always: every epoch).", _R)
    log_every: int | None = _f(None, "Off a terminal, a progress line every N steps. (default: every 20 s)", _R)
    tensorboard: bool | None = _f(None, "TensorBoard event files in OUT/tensorboard. (default: on when the tensorboard package is installed)", _R)
    # model overrides the recipe applies unless the user sets them (width, image_size, num_classes)
    model: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.lr_base * self.batch_size / self.lr_ref_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Every value type- and range-checked, with what it means (a config file can hold anything)."""
        check_types(self, "training setting")
        if not isinstance(self.model, dict):
            raise SasaError(f"training setting 'model' must be a mapping of model options, got {self.model!r}")
        if self.lr is not None and not self.lr > 0:
            raise SasaError(f"lr must be > 0, got {self.lr}")
        if not self.lr_base > 0 or self.lr_ref_batch < 1:
            raise SasaError(f"lr base must be > 0 and lr ref batch >= 1, got {self.lr_base} and {self.lr_ref_batch}")
        if not 0 <= self.momentum < 1:
            raise SasaError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise SasaError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise SasaError(f"grad clip (a gradient-norm limit; 0 = off) must be >= 0, got {self.grad_clip}")
        if self.synthetic_train < 1 or self.synthetic_eval < 1:
            raise SasaError(f"synthetic train/eval sizes must be >= 1, got {self.synthetic_train}/{self.synthetic_eval}")
        if self.precision not in PRECISIONS:
            raise SasaError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.schedule not in ("cosine", "constant"):
            raise SasaError(f"unknown schedule {self.schedule!r} (choose from cosine, constant)")
        if self.optimizer != "sgd":
            raise SasaError(f"unknown optimizer {self.optimizer!r} (only sgd)")
        if self.epochs <= 0:
            raise SasaError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2:
            raise SasaError(f"batch size must be >= 2 (BatchNorm in training needs 2+ images per process), got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SasaError(f"max steps must be >= 1, got {self.max_steps}")
        if self.warmup_epochs < 0:  # longer than the run: the whole run warms up (e.g. paper recipe, --epochs 2)
            raise SasaError(f"warmup epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.ema_decay < 1:
            raise SasaError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise SasaError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise SasaError(f"BN momentum must be in (0, 1], got {self.bn_momentum}")
        for name in ("eval_every", "checkpoint_every", "log_every", "eval_batch_size", "train_images", "eval_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SasaError(f"{name.replace('_', ' ')} must be >= 1, got {v}")
        if self.threads is not None and self.threads < 1:
            raise SasaError(f"threads must be >= 1, got {self.threads}")
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            raise SasaError(f"grad accum steps must be >= 1, got {self.grad_accum_steps}")
        if self.grad_accum_steps == 1:  # no accumulation: stored as unset, as before the setting existed
            self.grad_accum_steps = None
        if self.batch_size % (self.grad_accum_steps or 1):
            raise SasaError(f"batch size {self.batch_size} is not divisible by {self.grad_accum_steps} accumulation steps")
        if self.workers < 0:
            raise SasaError(f"workers must be >= 0, got {self.workers}")
        return self


RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},  # the dataclass defaults are the paper's appendix
    # Tuned on this 2-core CPU machine (see README): under 5 minutes, >= 85% Fashion-MNIST top-1
    # for sasa_resnet26 (86.1% in 251 s, one thread, another training on the other core).
    "short": {
        "data": "fashion-mnist",
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "warmup_epochs": 0.1,
        "weight_decay": 5e-5,
        "label_smoothing": 0.0,
        "ema_decay": 0.0,
        "bn_momentum": None,
        # bf16 only where the host computes it natively: elsewhere PyTorch's bf16 convolutions take
        # slow_conv2d (3.6x slower than fp32 on an AVX2 host without AVX512-BF16, measured).
        "precision": "auto",
        "channels_last": False,
        "workers": 0,
        "threads": None,  # all cores; `ablate --shard I/N` gives each shard cores/N
        "eval_batch_size": 500,
        # A fixed subset (the same for every seed) sized so that one ResNet-50 unit takes ~4
        # minutes on the slowest common host (a 2-core AVX2 laptop/VM, fp32): see README.
        "train_images": 10000,
        "eval_images": 5000,
        # One epoch is an under-fitting regime: augmentation (random crop + flip) cost ~3.5 points
        # on sasa_resnet26 (82.7% -> 86.1%), so the short recipe trains on the plain images.
        "augment": False,
        # The paper's logits have no 1/sqrt(d): at ResNet-50 depth, in bf16, at the peak LR the
        # attention nets diverged (NaN loss near the end of warm-up) from the default init.
        # Starting every residual block as its shortcut (torchvision's zero_init_residual) keeps
        # them stable without gradient clipping, which had cost ~3 points (see README).
        "zero_init_residual": True,
        "model": {"width": 0.25, "image_size": 64, "num_classes": 10},
    },
}

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Settings that change how a run goes, not what it computes: a resumed run may change them, and a
# result's key leaves them out (everything else in the config does alter the training).
NEUTRAL_FIELDS = frozenset({
    "data_dir", "workers", "threads", "eval_every", "eval_batch_size", "checkpoint_every", "log_every",
    "compile", "channels_last", "deterministic", "tensorboard",
})


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML or YAML mapping of TrainConfig keys (dashes or underscores)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SasaError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if Path(path).suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # tomllib/yaml/json errors all mean the same thing to the user
        raise SasaError(f"bad config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SasaError(f"bad config file {path}: expected a mapping of settings")
    data = data.get("train", data) if isinstance(data.get("train"), dict) else data
    # a saved config.yaml's record of --resume-override changes is history, not a setting
    return {k.replace("-", "_"): v for k, v in data.items() if k != "config_history"}


def _check_keys(values: dict[str, Any], where: str) -> None:
    unknown = set(values) - FIELDS
    if unknown:
        raise SasaError(f"unknown training setting(s) in {where}: {', '.join(sorted(unknown))}")


def resolve_config(
    recipe: str, config_file: Path | None = None, overrides: dict[str, Any] | None = None,
    recipes: dict[str, dict[str, Any]] | None = None,
) -> TrainConfig:
    """recipe -> config file -> overrides (``None`` values in overrides mean "not given").
    ``recipes``: another task's named recipes (detection's) instead of :data:`RECIPES`."""
    recipes = RECIPES if recipes is None else recipes
    if recipe not in recipes:
        raise SasaError(f"unknown recipe {recipe!r} (choose from {', '.join(recipes)})")
    values: dict[str, Any] = {"recipe": recipe, **recipes[recipe]}
    values["model"] = dict(values.get("model", {}))
    layers = []
    if config_file is not None:
        layers.append((read_config_file(config_file), str(config_file)))
    layers.append(({k: v for k, v in (overrides or {}).items() if v is not None}, "options"))
    for layer, where in layers:
        _check_keys(layer, where)
        model = layer.pop("model", None)
        if model is not None:
            if not isinstance(model, dict):
                raise SasaError(f"'model' in {where} must be a mapping of model options")
            values["model"].update({k.replace("-", "_"): v for k, v in model.items()})
        values.update(layer)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise SasaError(f"bad training settings: {e}") from None
    return cfg.validate()


def spec_for(cfg: TrainConfig, model: str | None = None, overrides: dict[str, Any] | None = None):
    """The ModelSpec to train: the preset, then the recipe/config's model settings, then
    ``overrides`` (the user's model flags; ``None`` = not given)."""
    from sasa_bench.spec import make_spec

    values = dict(cfg.model)
    if model is not None and "name" in values and values["name"] != model:
        values.pop("name")  # a saved config's name belongs to its own model
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if model is None and "name" in values and values["name"] in _preset_names():
        model = values.pop("name")
    return make_spec(model, **values)


def _preset_names() -> set[str]:
    from sasa_bench.spec import PRESETS

    return set(PRESETS)
