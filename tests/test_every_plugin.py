"""Every registered plugin is exercised here, parametrized over the live registry (as timm
does for its models), so a new expert, teacher, loss or dataset is tested the moment it is
registered. Fusers get the same treatment in ``test_fusers.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmix_core import (
    ExpertEncoder,
    ImageData,
    ModalitySpec,
    SlideData,
    TextData,
    VolumeData,
)
from medmix_core.errors import MedmixError, WeightsNotFoundError
from medmix_core.plugins import get_any_encoder, get_dataset, get_loss, registry

REG = registry()
EXPERTS = REG.names("experts")
TEACHERS = REG.names("teachers")
LOSSES = REG.names("losses")
DATASETS = REG.names("datasets")
BRIDGES = REG.names("bridges")
CXR = sorted((Path(__file__).parent / "fixtures" / "cxr").glob("*.jpeg"))


@pytest.fixture(scope="module")
def icu_payloads(tmp_path_factory):
    """Modality spec -> payloads of 6 real PhysioNet stays (present ones only)."""
    from medmix_datasets.physionet2012 import PhysioNet2012, write_subset

    src = write_subset(tmp_path_factory.mktemp("p12") / "few", 6)
    ds = PhysioNet2012(source=str(src))
    samples = ds.samples()
    out = {}
    for m in ds.modalities():
        present = [s.modalities[m.name] for s in samples if s.modalities[m.name] is not None]
        if len(present) >= 3:
            out[m.name] = (m, present)
    return out


def _slide(folder: Path) -> Path | None:
    """A small tiled pyramidal TIFF with a pixel size (0.25 um), or None without tifffile."""
    try:
        import tifffile
    except ImportError:
        return None
    path = folder / "slide.tiff"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        a = np.full((512, 512, 3), 235, np.uint8)  # background
        a[96:416, 96:416] = rng.integers(60, 200, (320, 320, 3), dtype=np.uint8)  # tissue
        with tifffile.TiffWriter(path) as tw:
            for k, f in enumerate((1, 2)):
                level = a[::f, ::f]
                tw.write(level, tile=(64, 64), photometric="rgb", resolutionunit="CENTIMETER",
                         resolution=(1e4 / (0.25 * f), 1e4 / (0.25 * f)),
                         subifds=1 if k == 0 else None, subfiletype=1 if k else 0)
    return path


def _other_payloads():
    import tempfile

    rng = np.random.default_rng(0)
    slide = _slide(Path(tempfile.gettempdir()) / "medmix-test-slide")
    return {
        "text": (ModalitySpec("note", "text"),
                 [TextData("Patient admitted with sepsis; lactate rising, on norepinephrine."),
                  TextData("Stable overnight. Extubated this morning, saturations 96% on air."),
                  TextData("Chest radiograph shows bilateral infiltrates.")]),
        "image": (ModalitySpec("cxr", "image"), [ImageData([str(p)]) for p in CXR]),
        "volume": (ModalitySpec("ct", "volume"),
                   [VolumeData(rng.uniform(-1000, 400, size=(12, 48, 48)).astype(np.float32))
                    for _ in range(2)]),
        **({"slide": (ModalitySpec("wsi", "slide"), [SlideData([str(slide)])] * 2)}
           if slide is not None else {}),
    }


def _assert_helpful(err: Exception) -> None:
    msg = str(err)
    assert len(msg) > 60, msg
    assert any(w in msg for w in ("pip install", "MEDMIX_MODEL_DIR", "model_path")), msg


@pytest.mark.parametrize("name", EXPERTS + TEACHERS)
def test_every_encoder_encodes_real_inputs_or_explains_absent_weights(name, icu_payloads):
    cls = get_any_encoder(name)
    assert issubclass(cls, ExpertEncoder) and cls.kinds, f"{name} must declare its kinds"
    try:
        enc = cls()
    except WeightsNotFoundError as err:
        _assert_helpful(err)
        pytest.skip(f"{name}: weights absent here ({str(err).splitlines()[0][:120]})")
    candidates = list(icu_payloads.values()) + list(_other_payloads().values())
    spec, payloads = next(((s, p) for s, p in candidates if enc.accepts(s)), (None, None))
    assert spec is not None, f"{name}: no test input for kinds {cls.kinds}"
    payloads = payloads[:4]
    try:
        enc.fit(spec, payloads)
        a = enc.encode(spec, payloads)
    except WeightsNotFoundError as err:
        _assert_helpful(err)
        pytest.skip(f"{name}: weights absent here ({str(err).splitlines()[0][:120]})")
    assert a.shape == (len(payloads), enc.dim(spec))
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, enc.encode(spec, payloads)), "encoding must be deterministic"
    prov = enc.provenance()
    assert prov.get("expert") == name or prov.get("name") == name or name in str(prov)


@pytest.mark.parametrize("name", LOSSES)
def test_every_distillation_loss_is_finite_differentiable_and_zero_on_agreement(name):
    loss = get_loss(name)()
    torch.manual_seed(0)
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5)
    v = loss(s, t)
    assert v.ndim == 0 and torch.isfinite(v) and v.item() > 0
    v.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_describes_itself_or_asks_for_its_source(name):
    cls = get_dataset(name)
    try:
        ds = cls()
        mods, tasks = ds.modalities(), ds.tasks()
    except MedmixError as err:  # a dataset with no bundled default must say what it needs
        assert "source" in str(err) or "spec" in str(err), str(err)
        return
    assert mods and tasks
    assert len({m.name for m in mods}) == len(mods)
    assert all(t.type in ("binary", "multilabel", "multiclass") for t in tasks)


@pytest.mark.parametrize("name", BRIDGES)
def test_every_bridge_writes_text_for_real_inputs_or_explains_absent_weights(name):
    from medmix_core.bridges import Bridge
    from medmix_core.plugins import get_bridge

    cls = get_bridge(name)
    assert issubclass(cls, Bridge) and cls.kinds, f"{name} must declare its kinds"
    candidates = list(_other_payloads().values())
    spec, payloads = next(((s, p) for s, p in candidates if s.kind in cls.kinds), (None, None))
    assert spec is not None, f"{name}: no test input for kinds {cls.kinds}"
    try:
        texts = cls().texts(spec, payloads[:2])
    except WeightsNotFoundError as err:
        _assert_helpful(err)
        pytest.skip(f"{name}: weights absent here ({str(err).splitlines()[0][:120]})")
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts)
