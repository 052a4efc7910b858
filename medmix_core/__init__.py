"""medmix core: interfaces, plugin registry, embedding store, training and CLI.

The core imports no plugin; built-in plugins register through entry points exactly as a
third-party one does.
"""

from medmix_core.batch import Batch, StoreTensors
from medmix_core.datasets import Dataset, stratified_split
from medmix_core.distill import DistillLoss, TeacherHeads, distill_weight
from medmix_core.errors import (
    DataError,
    DuplicatePluginError,
    MedmixError,
    StoreError,
    UnknownPluginError,
    WeightsNotFoundError,
)
from medmix_core.experts import ExpertEncoder, Teacher
from medmix_core.fusion import (
    MASK_SCORE,
    ExpertProjector,
    Fuser,
    FuserPlugin,
    FusionModel,
    FusionOutput,
    FusionSpec,
    InterFuser,
    IntraFuser,
    masked_softmax,
    mix,
    project_experts,
)
from medmix_core.hookspecs import hookimpl
from medmix_core.store import EmbeddingStore, StoreWriter
from medmix_core.types import (
    ImageData,
    ModalitySpec,
    Sample,
    SlideData,
    TabularData,
    TaskSpec,
    TextData,
    TimeSeriesData,
    VolumeData,
)

__version__ = "0.1.0"

__all__ = [
    "Batch", "StoreTensors", "Dataset", "stratified_split", "DistillLoss", "TeacherHeads",
    "distill_weight", "DataError", "DuplicatePluginError", "MedmixError", "StoreError",
    "UnknownPluginError", "WeightsNotFoundError", "ExpertEncoder", "Teacher", "MASK_SCORE",
    "ExpertProjector", "FusionModel", "FusionOutput", "FusionSpec", "Fuser", "FuserPlugin",
    "InterFuser",
    "IntraFuser", "masked_softmax", "mix", "project_experts", "hookimpl", "EmbeddingStore",
    "StoreWriter", "ImageData", "ModalitySpec", "Sample", "SlideData", "TabularData", "TaskSpec",
    "TextData", "TimeSeriesData", "VolumeData", "__version__",
]
