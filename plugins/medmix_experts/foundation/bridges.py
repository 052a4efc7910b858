"""Bridge loaders: generative models that turn an image into text, from local weights.

``maira2`` (Microsoft MAIRA-2, ``microsoft/maira-2``): chest X-ray -> draft findings. The
released checkpoint is a LLaVA-style model (its remote code subclasses transformers'
``LlavaForConditionalGeneration``); it is rebuilt here from its own ``config.json`` with
the same parameter names, so the released safetensors load without ``trust_remote_code``:

* ``vision_tower``: a transformers ``Dinov2Backbone`` (RAD-DINO) built from
  ``vision_config``;
* ``multi_modal_projector.layers``: ``projector_n_layers`` linear layers (4 in MAIRA-2)
  with ``projector_hidden_act`` between them, vision width -> text width;
* ``language_model``: ``AutoModelForCausalLM`` from ``text_config`` (Vicuna-7B).

Image features are the hidden states of ``vision_feature_layer`` (-1: the last layer,
before the final norm), without the CLS token when ``vision_feature_select_strategy`` is
"default", projected to the text width and spliced into the prompt where ``<image>``
stands. Decoding is greedy (deterministic), up to ``max_new_tokens`` tokens.

What is not reproduced: MAIRA-2's processor also accepts a lateral view, a prior study and
the INDICATION / TECHNIQUE / COMPARISON sections, and can ground findings with boxes; this
bridge sends the first (frontal) view with the findings prompt only (option ``prompt``
replaces it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from medmix_core.bridges import Bridge
from medmix_core.errors import DataError
from medmix_core.types import ImageData, ModalitySpec, Payload

from .base import COMMON_OPTIONS, ExpertOptionError
from .imaging import BICUBIC, ImagePreprocess, load_image
from .text_experts import TOKENIZER_FILES
from .weights import CheckpointError, ResolvedWeights, WeightsSpec, read_json, resolve_weights

#: MAIRA-2's system message and findings instruction (Vicuna conversation format)
MAIRA2_SYSTEM = ("You are an expert radiology assistant tasked with interpreting a chest "
                 "X-ray study.")
MAIRA2_PROMPT = ("Given the current frontal image <image>. Provide a description of the "
                 "findings in the radiology study.")
# RAD-DINO's processor: shortest edge 518, center crop 518, its own mean/std
RAD_DINO_PREPROCESS = ImagePreprocess(518, None, (518, 518), BICUBIC,
                                      (0.5307, 0.5307, 0.5307), (0.2583, 0.2583, 0.2583))


def load_safetensors(weights: ResolvedWeights) -> dict[str, Any]:
    """Every tensor of a checkpoint: one ``model.safetensors`` or the shards its index
    names (``model.safetensors.index.json``)."""
    from safetensors.torch import load_file

    if weights.weight_file.name.endswith(".index.json"):
        index = read_json(weights.weight_file)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise CheckpointError(f"{weights.weight_file} names no shards; download the "
                                  f"checkpoint again.")
        out: dict[str, Any] = {}
        for shard in shards:
            path = weights.path / shard
            if not path.is_file():
                raise CheckpointError(f"Shard {shard} named by {weights.weight_file} is missing "
                                      f"from {weights.path}; the download is incomplete.")
            out.update(load_file(str(path)))
        return out
    if weights.weight_file.suffix != ".safetensors":
        raise CheckpointError(f"{weights.weight_file}: this bridge reads safetensors "
                              f"checkpoints (the released format).")
    return load_file(str(weights.weight_file))


class Maira2Bridge(Bridge):
    """MAIRA-2: chest X-ray -> findings text (greedy decoding)."""

    name: ClassVar[str] = "maira2"
    kinds: ClassVar[tuple[str, ...]] = ("image",)
    version: ClassVar[str] = "1"
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="maira2", repo_id="microsoft/maira-2", local_names=("maira2", "maira-2"),
        weight_files=("model.safetensors", "model.safetensors.index.json"),
        tokenizer_files=TOKENIZER_FILES)
    default_options: ClassVar[dict[str, Any]] = {
        "max_new_tokens": 300, "prompt": MAIRA2_PROMPT, "system_prompt": MAIRA2_SYSTEM}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        allowed = {**COMMON_OPTIONS, **self.default_options}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ExpertOptionError(f"Unknown option(s) {unknown} for bridge 'maira2'. Known "
                                    f"options: {', '.join(sorted(allowed))}.")
        self.opts = {**allowed, **options}
        n = self.opts["max_new_tokens"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ExpertOptionError(f"Option max_new_tokens={n!r} of 'maira2' must be a "
                                    f"positive integer.")
        if self.opts["prompt"].count("<image>") != 1:
            raise ExpertOptionError("Option prompt of 'maira2' must hold '<image>' exactly once "
                                    "(where the image features go).")
        self.weights = resolve_weights(self.spec, model_path=self.opts["model_path"],
                                       allow_download=bool(self.opts["allow_download"]),
                                       cache_dir=self.opts["cache_dir"],
                                       repo_id=self.opts["model_id"])
        self.config = read_json(self.weights.config_file)
        if self.config.get("model_type") != "maira2":
            raise CheckpointError(
                f"{self.weights.config_file} has model_type={self.config.get('model_type')!r}; "
                f"bridge 'maira2' loads 'maira2' (microsoft/maira-2). Point model_path at it.")
        self._device = str(self.opts["device"])
        self._model: Any = None
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ loading
    def _build(self):
        from torch import nn
        from transformers import CONFIG_MAPPING, AutoBackbone, AutoModelForCausalLM
        from transformers.activations import ACT2FN

        def sub_config(key: str):
            cfg = dict(self.config.get(key) or {})
            mt = cfg.pop("model_type", None)
            if mt not in CONFIG_MAPPING:
                raise CheckpointError(f"{self.weights.config_file}: {key}.model_type={mt!r} is "
                                      f"not a transformers architecture.")
            return CONFIG_MAPPING[mt](**cfg)

        vision_cfg, text_cfg = sub_config("vision_config"), sub_config("text_config")
        n_layers = int(self.config.get("projector_n_layers", 4))
        act = self.config.get("projector_hidden_act", "gelu")

        class Projector(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                layers: list[nn.Module] = [nn.Linear(vision_cfg.hidden_size,
                                                     text_cfg.hidden_size)]
                for _ in range(n_layers - 1):
                    layers += [ACT2FN[act], nn.Linear(text_cfg.hidden_size, text_cfg.hidden_size)]
                self.layers = nn.Sequential(*layers)

            def forward(self, x):
                return self.layers(x)

        class Maira2(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vision_tower = AutoBackbone.from_config(vision_cfg)
                self.multi_modal_projector = Projector()
                self.language_model = AutoModelForCausalLM.from_config(text_cfg)

        model = Maira2()
        state = load_safetensors(self.weights)
        own = set(model.state_dict())
        missing = sorted(own - set(state))
        if text_cfg.tie_word_embeddings and "language_model.lm_head.weight" in missing:
            missing.remove("language_model.lm_head.weight")
        unexpected = sorted(set(state) - own)
        if missing or unexpected:
            raise CheckpointError(
                f"The checkpoint in {self.weights.path} does not match MAIRA-2's layout: "
                f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} "
                f"unexpected (e.g. {unexpected[:3]}). Download microsoft/maira-2 again.")
        model.load_state_dict(state, strict=False)
        if text_cfg.tie_word_embeddings:
            model.language_model.tie_weights()
        return model

    @property
    def model(self):
        if self._model is None:
            import torch

            dtype = {"float32": torch.float32, "float16": torch.float16,
                     "bfloat16": torch.bfloat16}[self.opts["dtype"]]
            model = self._build().eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model.to(device=self._device, dtype=dtype)
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.weights.path),
                                                            local_files_only=True)
        return self._tokenizer

    def preprocess(self) -> ImagePreprocess:
        return ImagePreprocess.from_hf_processor(self.weights.path, RAD_DINO_PREPROCESS)

    def to(self, device: str) -> Maira2Bridge:
        self._device = str(device)
        if self._model is not None:
            self._model = self._model.to(self._device)
        return self

    def n_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def provenance(self) -> dict[str, Any]:
        from medmix_core.store import sha256_file

        out = super().provenance()
        out.update({"model_id": self.weights.repo_id, "local_path": str(self.weights.path),
                    "weights_sha256": {p.name: sha256_file(p)
                                       for p in self.weights.weight_files()},
                    "decoding": f"greedy, max_new_tokens={self.opts['max_new_tokens']}"})
        return out

    # ------------------------------------------------------------------ generation
    def conversation(self) -> tuple[str, str]:
        """The prompt text before and after ``<image>`` (Vicuna conversation format)."""
        full = f"{self.opts['system_prompt']} USER: {self.opts['prompt']} ASSISTANT:"
        before, after = full.split("<image>")
        return before, after

    def image_features(self, pixels):
        """``[n, 3, H, W]`` -> ``[n, P, d_text]`` projected patch features."""
        out = self.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
        feats = out.hidden_states[int(self.config.get("vision_feature_layer", -1))]
        if self.config.get("vision_feature_select_strategy", "default") == "default":
            feats = feats[:, 1:]  # drop CLS
        return self.model.multi_modal_projector(feats)

    def prompt_embeddings(self, pixels):
        """``[1, L, d_text]``: prompt tokens with the image features in place of <image>."""
        import torch

        tok, lm = self.tokenizer, self.model.language_model
        before, after = self.conversation()
        ids_b = tok(before, return_tensors="pt")["input_ids"].to(self._device)
        ids_a = tok(after, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
            self._device)
        table = lm.get_input_embeddings()
        return torch.cat([table(ids_b), self.image_features(pixels), table(ids_a)], dim=1)

    def generate(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> list[str]:
        """One findings text per image payload (its first view).

        Returns:
            N strings, greedy-decoded, special tokens removed.
        """
        import torch

        prep = self.preprocess()
        tok, lm = self.tokenizer, self.model.language_model
        dtype = next(self.model.parameters()).dtype
        eos = tok.eos_token_id
        out = []
        for i, p in enumerate(payloads):
            if not isinstance(p, ImageData) or not p.views or p.views[0] is None:
                found = type(p).__name__ if not isinstance(p, ImageData) else "no views"
                raise DataError(f"maira2: modality {modality.name!r} payload {i} is {found}; "
                                f"expected ImageData with a frontal view first.")
            arr = prep(load_image(p.views[0], where=f"{modality.name}[{i}] view 0"))
            pixels = torch.from_numpy(arr[None]).to(self._device, dtype=dtype)  # [1, 3, H, W]
            with torch.no_grad():
                x = self.prompt_embeddings(pixels)  # [1, L, d]
                ids = lm.generate(inputs_embeds=x, attention_mask=torch.ones(
                    x.shape[:2], dtype=torch.long, device=x.device),
                    max_new_tokens=int(self.opts["max_new_tokens"]), do_sample=False,
                    num_beams=1, eos_token_id=eos,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos)
            out.append(tok.decode(ids[0], skip_special_tokens=True).strip())
        return out


def write_maira2_config(folder: Path, vision_config: dict, text_config: dict,
                        projector_n_layers: int = 4, **extra: Any) -> None:
    """A ``config.json`` in MAIRA-2's layout (used to describe a checkpoint folder)."""
    cfg = {"model_type": "maira2", "architectures": ["Maira2ForConditionalGeneration"],
           "vision_config": vision_config, "text_config": text_config,
           "projector_n_layers": projector_n_layers, "projector_hidden_act": "gelu",
           "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
           "image_token_index": 32204, **extra}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))


BRIDGES = (Maira2Bridge,)

__all__ = ["BRIDGES", "MAIRA2_PROMPT", "MAIRA2_SYSTEM", "Maira2Bridge", "load_safetensors",
           "write_maira2_config"]
