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
rag-medcpt     rag       tabular,          ncbi/MedCPT-* + Qwen/Qwen2-0.5B + the MedlinePlus
                         timeseries, text, health-topics XML
                         image (bridge)
onellm         general   image, volume     csuhan/OneLLM-7B (consolidated.00-of-01.pth)
=============  ========  ================  =================================================

Teachers (``register_teachers``): ``dinov3`` (facebook/dinov3-vitb16-pretrain-lvd1689m).

Bridges (``register_bridges``): ``maira2`` (microsoft/maira-2), a chest X-ray to its
findings, for ``rag-medcpt``.

Weights are found in the ``model_path`` option, ``$MEDMIX_MODEL_DIR/<name>`` (``medcpt``:
``medcpt-query`` / ``medcpt-article``) or ``$MEDMIX_MODEL_DIR/<org>/<repo>``, or the local
Hugging Face cache; nothing is downloaded unless ``allow_download=True``. Another size of a
model is picked with ``model_id`` (e.g. ``dinov2`` with ``model_id="facebook/dinov2-large"``).
"""

from __future__ import annotations

from medmix_core import hookimpl

from .base import ExpertOptionError, FoundationExpert
from .bridges import BRIDGES, Maira2Bridge
from .chronos import ChronosExpert, MeanScaleUniformBins
from .image_experts import BiomedCLIPExpert, Dinov2Expert, Dinov3Teacher, ImageExpert
from .onellm import OneLLMExpert
from .rag_medcpt import RAGMedCPTExpert
from .text_experts import GatorTronExpert, MedCPTExpert, Qwen2Expert, TextExpert
from .weights import CheckpointError, WeightsSpec, resolve_weights

EXPERTS = (BiomedCLIPExpert, Dinov2Expert, GatorTronExpert, Qwen2Expert, MedCPTExpert,
           ChronosExpert, OneLLMExpert, RAGMedCPTExpert)
TEACHERS = (Dinov3Teacher,)


@hookimpl
def register_experts(register):
    for cls in EXPERTS:
        register(cls.name, cls)


@hookimpl
def register_teachers(register):
    for cls in TEACHERS:
        register(cls.name, cls)


@hookimpl
def register_bridges(register):
    for cls in BRIDGES:
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
    "Maira2Bridge",
    "MeanScaleUniformBins",
    "MedCPTExpert",
    "OneLLMExpert",
    "Qwen2Expert",
    "RAGMedCPTExpert",
    "TextExpert",
    "WeightsSpec",
    "register_bridges",
    "register_experts",
    "register_teachers",
    "resolve_weights",
]
