"""Bridges: the interface's checks, the registry kind, and the MAIRA-2 loader on a tiny
randomly initialised model of the same architecture and file layout, against a greedy
decoding loop written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medmix_core import hookimpl
from medmix_core.bridges import Bridge
from medmix_core.errors import DataError, UnknownPluginError, WeightsNotFoundError
from medmix_core.plugins import get_bridge, registry
from medmix_core.types import ImageData, ModalitySpec, TextData

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

from medmix_experts.foundation.base import ExpertOptionError  # noqa: E402
from medmix_experts.foundation.bridges import Maira2Bridge, write_maira2_config  # noqa: E402
from medmix_experts.foundation.weights import CheckpointError  # noqa: E402
from tiny_models import _randomise, bpe_tokenizer, cxr_paths  # noqa: E402

CXR = ModalitySpec("cxr", "image")


class Echo(Bridge):
    """Returns what it is told to (to test the interface's checks)."""

    name = "echo"
    kinds = ("image",)

    def __init__(self, reply=None, **options):
        super().__init__(**options)
        self.reply = reply

    def generate(self, modality, payloads):
        return self.reply(payloads) if self.reply else ["x"] * len(payloads)


def test_interface_checks_what_a_bridge_returns():
    img = [ImageData([np.zeros((4, 4, 3), np.uint8)])] * 2
    assert Echo().texts(CXR, img) == ["x", "x"] and Echo().texts(CXR, []) == []
    with pytest.raises(DataError, match="returned 1 texts for 2"):
        Echo(lambda p: ["a"]).texts(CXR, img)
    with pytest.raises(DataError, match="empty text for payload 1"):
        Echo(lambda p: ["a", " "]).texts(CXR, img)
    with pytest.raises(DataError, match="kind 'text'"):
        Echo().texts(ModalitySpec("note", "text"), [TextData("a")])
    assert Echo(a=1).provenance() == {"bridge": "echo", "version": "1", "options": {"a": 1}}


def test_bridges_are_a_registry_kind():
    from conftest import registered

    class Plugin:
        @hookimpl
        def register_bridges(self, register):
            register("echo", Echo)

    with registered(Plugin()):
        assert get_bridge("echo") is Echo
        assert "echo" in registry().names("bridges")
        with pytest.raises(UnknownPluginError, match="Did you mean 'echo'"):
            get_bridge("ecoh")


# ----------------------------------------------------------------------------- MAIRA-2
def make_maira2(folder: Path, seed: int = 0):
    """A tiny MAIRA-2: Dinov2 backbone, 4-layer projector, Llama LM, released names."""
    from safetensors.torch import save_file
    from transformers import Dinov2Backbone, Dinov2Config, LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    vcfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                        patch_size=8, image_size=32, out_features=["stage2"])
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    vision, lm = Dinov2Backbone(vcfg), LlamaForCausalLM(tcfg)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                               torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 32))
    for i, m in enumerate((vision, lm, proj)):
        _randomise(m, seed + i)
    with torch.no_grad():
        for p in proj.parameters():
            p.mul_(8.0)  # strong enough that the image changes the text
    sd = {**{f"vision_tower.{k}": v for k, v in vision.state_dict().items()},
          **{f"multi_modal_projector.layers.{k}": v for k, v in proj.state_dict().items()},
          **{f"language_model.{k}": v for k, v in lm.state_dict().items()}}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    write_maira2_config(folder, vcfg.to_dict(), tcfg.to_dict())
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True,
        "size": {"shortest_edge": 32}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32}, "image_mean": [0.53, 0.53, 0.53],
        "image_std": [0.26, 0.26, 0.26]}))
    tok.save_pretrained(folder)
    return vision.eval(), proj.eval(), lm.eval(), tok


@pytest.fixture(scope="module")
def maira2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maira2")
    return folder, *make_maira2(folder)


def _greedy(parts, prompt_before, prompt_after, pixels, n_new):
    """Greedy decoding with a full forward pass per step (no cache), from the raw parts."""
    vision, proj, lm, tok = parts
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = proj(hidden[-1][:, 1:])  # last layer, CLS dropped
        table = lm.get_input_embeddings()
        ids_b = tok(prompt_before, return_tensors="pt")["input_ids"]
        ids_a = tok(prompt_after, add_special_tokens=False, return_tensors="pt")["input_ids"]
        x = torch.cat([table(ids_b), feats, table(ids_a)], dim=1)
        new = []
        for _ in range(n_new):
            nxt = int(lm(inputs_embeds=x).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            x = torch.cat([x, table(torch.tensor([[nxt]]))], dim=1)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_maira2_generates_what_greedy_decoding_of_the_parts_gives(maira2):
    folder, *parts = maira2
    bridge = Maira2Bridge(model_path=str(folder), max_new_tokens=12)
    paths = cxr_paths()[:2]
    pays = [ImageData([str(p)]) for p in paths]
    texts = bridge.generate(CXR, pays)
    prep = bridge.preprocess()
    assert prep.crop_hw == (32, 32) and prep.mean == (0.53, 0.53, 0.53)
    from medmix_experts.foundation.imaging import load_image

    before, after = bridge.conversation()
    assert before.endswith("Given the current frontal image ") and after.startswith(".")
    for text, path in zip(texts, paths):
        pixels = torch.from_numpy(prep(load_image(str(path)))[None])
        assert text == _greedy(parts, before, after, pixels, 12)
    assert all(isinstance(t, str) for t in texts)
    assert bridge.generate(CXR, pays) == texts  # deterministic
    # the image reaches the text: a black image and the X-ray do not read the same
    black = bridge.generate(CXR, [ImageData([np.zeros((40, 40, 3), np.uint8)])])
    assert black != texts[:1]
    prov = bridge.provenance()
    assert prov["bridge"] == "maira2" and "model.safetensors" in prov["weights_sha256"]
    assert bridge.n_parameters() == sum(p.numel() for m in parts[:3] for p in m.parameters())


def test_maira2_loads_sharded_checkpoints(maira2, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = maira2[0]
    sd = load_file(str(folder / "model.safetensors"))
    out = tmp_path / "sharded"
    out.mkdir()
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(out / name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    for f in folder.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            (out / f.name).write_bytes(f.read_bytes())
    img = [ImageData([str(cxr_paths()[0])])]
    a = Maira2Bridge(model_path=str(out), max_new_tokens=6).generate(CXR, img)
    assert a == Maira2Bridge(model_path=str(folder), max_new_tokens=6).generate(CXR, img)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Maira2Bridge(model_path=str(out)).generate(CXR, img)


def test_maira2_fails_fast_and_clearly(maira2, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as err:
        Maira2Bridge()
    msg = str(err.value)
    assert "microsoft/maira-2" in msg and "MEDMIX_MODEL_DIR" in msg and "model_path" in msg
    folder = maira2[0]
    with pytest.raises(ExpertOptionError, match="Unknown option"):
        Maira2Bridge(model_path=str(folder), temperature=0.7)
    with pytest.raises(ExpertOptionError, match="<image>"):
        Maira2Bridge(model_path=str(folder), prompt="Describe the findings.")
    with pytest.raises(ExpertOptionError, match="max_new_tokens"):
        Maira2Bridge(model_path=str(folder), max_new_tokens=0)
    other = tmp_path / "other"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model_type='llava'"):
        Maira2Bridge(model_path=str(other))
    (other / "config.json").write_text(json.dumps({**cfg, "projector_n_layers": 2}))
    with pytest.raises(CheckpointError, match="does not match MAIRA-2's layout"):
        Maira2Bridge(model_path=str(other)).generate(CXR, [ImageData([str(cxr_paths()[0])])])
    with pytest.raises(DataError, match="expected ImageData"):
        Maira2Bridge(model_path=str(folder)).generate(CXR, [TextData("a")])
