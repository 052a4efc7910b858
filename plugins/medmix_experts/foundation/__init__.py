"""Foundation-model experts of the MedMIX paper, loaded from local weights.

Experts (``register_experts``):

=============  ========  ================  =================================================
name           family    kinds             weights (Hugging Face id)
=============  ========  ================  =================================================
biomedclip     domain    image, volume     microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
dinov2         general   image, volume     facebook/dinov2-base
gatortron      domain    text              UFNLP/gatortron-base
qwen2          general   text              Qwen/Qwen2-0.5B
medcpt         domain    text              ncbi/MedCPT-Query-Encoder (encoder="article":
                                           ncbi/MedCPT-Article-Encoder)
chronos        general   timeseries        amazon/chronos-t5-small
=============  ========  ================  =================================================

Teachers (``register_teachers``): ``dinov3`` (facebook/dinov3-vitb16-pretrain-lvd1689m).

Weights are found in the ``model_path`` option, ``$MEDMIX_MODEL_DIR/<name>`` (``medcpt``:
``medcpt-query`` / ``medcpt-article``) or ``$MEDMIX_MODEL_DIR/<org>/<repo>``, or the local
Hugging Face cache; nothing is downloaded unless ``allow_download=True``. Another size of a
model is picked with ``model_id`` (e.g. ``dinov2`` with ``model_id="facebook/dinov2-large"``).
"""

from __future__ import annotations

from medmix_core import hookimpl

from .base import ExpertOptionError, FoundationExpert
from .chronos import ChronosExpert, MeanScaleUniformBins
from .image_experts import BiomedCLIPExpert, Dinov2Expert, Dinov3Teacher, ImageExpert
from .text_experts import GatorTronExpert, MedCPTExpert, Qwen2Expert, TextExpert
from .weights import CheckpointError, WeightsSpec, resolve_weights

EXPERTS = (BiomedCLIPExpert, Dinov2Expert, GatorTronExpert, Qwen2Expert, MedCPTExpert,
           ChronosExpert)
TEACHERS = (Dinov3Teacher,)


@hookimpl
def register_experts(register):
    for cls in EXPERTS:
        register(cls.name, cls)


@hookimpl
def register_teachers(register):
    for cls in TEACHERS:
        register(cls.name, cls)


__all__ = [
    "BiomedCLIPExpert",
    "CheckpointError",
    "ChronosExpert",
    "Dinov2Expert",
    "Dinov3Teacher",
    "ExpertOptionError",
    "FoundationExpert",
    "GatorTronExpert",
    "ImageExpert",
    "MeanScaleUniformBins",
    "MedCPTExpert",
    "Qwen2Expert",
    "TextExpert",
    "WeightsSpec",
    "register_experts",
    "register_teachers",
    "resolve_weights",
]
