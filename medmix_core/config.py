"""RunConfig: every setting of a run, validated; saved resolved next to the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medmix_core.errors import MedmixError


def parse_names(value: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """The one parser of name lists (``--experts a,b``, ``--fuser``, ``--keep-modalities``,
    ...): a comma-separated string or a list -> names, stripped, empty ones dropped, order
    kept; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [x.strip() for x in items if x.strip()]


#: ``preset: paper``: the paper's training recipe (Cho, Li, Qiu 2026): base lr 1e-5, up to
#: 200 epochs with patience 20 on validation loss, no mask augmentation, one model per seed,
#: eq. 3's convex mix (the ``medmix`` fuser's default). Values given explicitly still win;
#: a dataset's ``run_defaults`` do not apply under it.
PAPER_PRESET: dict[str, Any] = {
    "lr": 1e-5, "epochs": 200, "patience": 20, "modality_dropout": 0.0, "expert_dropout": 0.0,
    "ema_decay": None, "label_smoothing": 0.0, "val_smoothing": 1, "refit": False,
}
PRESETS: dict[str, dict[str, Any]] = {"default": {}, "paper": PAPER_PRESET}


class RunConfig(BaseModel):
    """Settings of ``medmix run``. Unknown keys are errors (``extra="forbid"``).

    ``preset`` names a recipe whose values fill every setting not given explicitly:
    "default" (the built-in defaults below, with the dataset's ``run_defaults``) or "paper"
    (:data:`PAPER_PRESET`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: Literal["default", "paper"] = "default"

    # data
    dataset: str = "physionet2012"
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    source: str | None = None
    store: str | None = None
    experts: list[str] | None = None
    drop_experts: list[str] = Field(default_factory=list)
    expert_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    teacher: str | None = None
    task: str | None = None
    keep_modalities: list[str] | None = None
    # model
    fuser: str = "medmix"
    fuser_options: dict[str, Any] = Field(default_factory=dict)
    d: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    modality_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    expert_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # distillation
    distill: bool | None = None
    distill_losses: dict[str, float] = Field(default_factory=lambda: {"cosine": 1.0, "rkd": 0.1})
    lambda_d_max: float = Field(0.5, ge=0.0)
    distill_ramp_epochs: int = Field(10, ge=0)
    # optimisation
    seeds: list[int] = Field(default_factory=lambda: [0])
    epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    router_lr_scale: float = Field(0.3, gt=0.0)
    warmup_epochs: float = Field(2.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    batch_size: int = Field(256, ge=1)
    pos_weight: Union[bool, float] = True
    #: exponential moving average of the weights (decay per step, warmed up as
    #: min(decay, (1 + t) / (10 + t))): validation, early stopping and the saved model use
    #: the averaged weights; None trains and keeps the raw weights
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    #: training targets y (1 - eps) + eps / 2 (BCE) or eps spread over the classes (CE);
    #: the validation loss is always computed on the true labels
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    #: early stopping and the best epoch use the mean validation loss of the last N epochs
    #: (1 = the epoch's own loss)
    val_smoothing: int = Field(1, ge=1)
    #: after early stopping, retrain each seed on train + validation for the chosen epoch
    #: count (best epoch + 1) and deploy that model, with the threshold chosen before
    refit: bool = False
    threshold: Union[float, Literal["val"]] = 0.5
    #: train the seeds one after another instead of together as one vectorised model
    #: (fusers that cannot be vectorised always train one after another)
    sequential: bool = False
    #: under torchrun: every process trains each seed on its share of every batch (DDP)
    #: instead of the processes sharing out the seeds
    data_parallel: bool = False
    #: read embeddings from disk batch by batch instead of loading the store into memory;
    #: None decides by size (streams when they exceed half of the memory available)
    stream: bool | None = None
    #: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N
    device: str = "auto"
    #: CPU threads for training; fusion networks are small, and one thread is faster than
    #: several whenever other work shares the cores (measured: 70 vs 600 ms per step)
    threads: int | None = Field(1, ge=1)
    amp: bool = True
    # missingness protocol applied to masks (see medmix_core.protocols)
    protocol: dict[str, Any] | None = None
    # outputs
    out: str | None = None
    external_test: str | None = None
    #: dataset plugin that reads a raw ``external_test`` source (default: ``dataset``)
    external_dataset: str | None = None
    bootstrap: int = Field(200, ge=0)
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        name = values.get("preset", "default")
        if name not in PRESETS:
            return values  # the Literal field reports the unknown name
        return {**PRESETS[name], **values}

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"seeds must be >= 1 (a count) or a list, got {v}")
            return list(range(v))
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        head, sep, index = v.partition(":")
        if v in ("auto", "cpu", "cuda") or (head == "cuda" and sep and index.isdigit()):
            return v
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: Any) -> Any:
        if v != "val" and not 0.0 < float(v) < 1.0:
            raise ValueError(f"a decision threshold is a probability strictly between 0 and 1 "
                             f"(or 'val'), got {v}")
        return v

    @field_validator("experts", "drop_experts", "keep_modalities", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        return parse_names(v) if isinstance(v, str) else v

    @property
    def distill_on(self) -> bool:
        return bool(self.teacher) if self.distill is None else self.distill


def format_validation_error(exc: ValidationError, where: str = "run config") -> str:
    lines = [f"Invalid {where}:"]
    for err in exc.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        value = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting; allowed settings: {', '.join(RunConfig.model_fields)}"
        lines.append(f"  {field} = {value!r}: {msg}")
    return "\n".join(lines)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (validated later, with flags on top)."""
    p = Path(path)
    if not p.is_file():
        raise MedmixError(f"Config file {str(p)!r} does not exist. Pass an existing JSON or "
                          f"YAML file to --config.")
    text = p.read_text("utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise MedmixError(f"Config file {p} could not be parsed ({exc}). Expected JSON, or YAML "
                          f"with a .yaml/.yml suffix.") from exc
    if not isinstance(data, dict):
        raise MedmixError(f"Config file {p}: expected a mapping of settings, found "
                          f"{type(data).__name__}.")
    return data


PROJECT_FILES = ("medmix.yaml", "medmix.yml", "medmix.json")


def load_project_defaults(folder: Path) -> tuple[dict[str, Any], str]:
    """Project defaults: ``medmix.yaml``/``.yml``/``.json`` in ``folder``, else a
    ``[tool.medmix]`` table of ``folder/pyproject.toml``. Relative paths in ``source``,
    ``store``, ``out`` and ``dataset_options.spec`` resolve against ``folder``.

    Returns:
        (values, where they came from) — ({}, "") when there is no project file.
    """
    values: dict[str, Any] = {}
    where = ""
    for name in PROJECT_FILES:
        if (folder / name).is_file():
            values, where = load_config_file(folder / name), str(folder / name)
            break
    else:
        pp = folder / "pyproject.toml"
        if pp.is_file():
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            try:
                data = tomllib.loads(pp.read_text("utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise MedmixError(f"{pp} is not valid TOML ({exc}); fix it or remove its "
                                  f"[tool.medmix] table.") from exc
            values = data.get("tool", {}).get("medmix", {})
            where = f"{pp} [tool.medmix]" if values else ""
    for key in ("source", "store", "out", "external_test"):
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
            values[key] = str(folder / values[key])
    opts = values.get("dataset_options")
    if isinstance(opts, dict) and isinstance(opts.get("spec"), str) \
            and not Path(opts["spec"]).is_absolute():
        values["dataset_options"] = {**opts, "spec": str(folder / opts["spec"])}
    return values, where


def make_config(**values: Any) -> RunConfig:
    """RunConfig from values, with pydantic errors turned into one readable MedmixError."""
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise MedmixError(format_validation_error(exc)) from None
