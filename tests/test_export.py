"""medmix export: every per-patient fuser as ONNX and TorchScript, checked against torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmix_core.batch import StoreTensors
from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.export import (
    PARITY_ATOL,
    check_per_patient,
    export_run,
    flat_inputs,
    input_names,
    load_run_models,
    onnx_predict,
)
from medmix_core.plugins import get_fuser, registry
from medmix_core.runner import save_model
from medmix_core.runs import RunFolder
from medmix_core.training import SeedResult, build_fuser, make_spec, predict_rows

#: fusers whose prediction for a patient depends on the rest of the batch, or which read
#: teacher embeddings at inference: export refuses them (the test checks it does)
NOT_EXPORTABLE = {"m3care": "not per-patient", "adacomed": "teacher",
                  "teacher-only": "teacher"}


#: options a fuser needs on the synthetic store (which has no expert of its own name)
FUSER_OPTIONS = {"onellm": {"expert": "e0"}}


def _run_folder(tmp_path, store, fuser: str, seeds=(0,)):
    """A run folder with untrained weights: parity needs real inputs, not a good model."""
    teacher = get_fuser(fuser).reads_teacher
    tensors = StoreTensors.from_store(store, None, None, "teacher" if teacher else None)
    spec = make_spec(tensors)
    cfg = RunConfig(store=str(store.path), fuser=fuser, d=16, teacher="teacher" if teacher
                    else None, distill=False, fuser_options=FUSER_OPTIONS.get(fuser, {}))
    out = tmp_path / fuser
    folder = RunFolder.prepare(out).start(seeds=list(seeds))
    for s in seeds:
        torch.manual_seed(s)
        model = build_fuser(cfg, spec).eval()
        save_model(SeedResult(s, model, 0, 1, 0.5), spec, cfg, folder.seed_dir(s))
        folder.seed_done(s)
    folder.write_text("config.json", cfg.model_dump_json())
    folder.finish()
    return out, tensors


def _test_rows(store, tensors, n=48):
    rows = torch.as_tensor(store.splits["test"][:n])
    avail = tensors.modality_mask()[rows]
    assert (~avail).any(1).sum() >= 5, "the parity batch must hold rows with missing modalities"
    return rows


def _torch_mean(run_dir, tensors, rows):
    models, _ = load_run_models(run_dir)
    outs = [predict_rows(m, tensors, rows, torch.device("cpu")) for m in models]
    return {k: torch.stack([o[k] for o in outs]).mean(0).numpy()
            for k in ("probs", "modality_weights", "router_weights") if k in outs[0]}


def _exportable():
    return sorted(n for n in registry().names("fusers") if n not in NOT_EXPORTABLE)


def test_torchscript_export_matches_torch_with_missing_modalities(tmp_path, synth_store):
    run_dir, tensors = _run_folder(tmp_path, synth_store, "medmix", seeds=(0, 1))
    rows = _test_rows(synth_store, tensors)
    path = export_run(run_dir, "torchscript", batch=tensors.batch(rows[:32]))
    side = json.loads((path.parent / (path.name + ".json")).read_text())
    assert side["seeds"] == [0, 1] and [i["name"] for i in side["inputs"]] == \
        input_names(load_run_models(run_dir)[0][0].spec)
    assert [o["name"] for o in side["outputs"]] == ["probs", "modality_weights",
                                                    "router_weights"]
    scripted = torch.jit.load(str(path))
    spec = load_run_models(run_dir)[0][0].spec
    batch = tensors.batch(rows)  # 48 rows: another batch size than the traced 32
    with torch.no_grad():
        got = scripted(*flat_inputs(batch, spec))
    want = _torch_mean(run_dir, tensors, rows)
    for name, g in zip(side["outputs"], got):
        np.testing.assert_allclose(g.numpy(), want[name["name"]], atol=PARITY_ATOL)
    mw = got[1].numpy()
    assert np.all(mw[~batch.modality_mask.numpy()] == 0.0)  # missing modalities weigh 0


def test_export_refuses_unknown_format_and_empty_run(tmp_path, synth_store):
    run_dir, _ = _run_folder(tmp_path, synth_store, "meanavg")
    with pytest.raises(MedmixError, match="expected one of onnx, torchscript"):
        export_run(run_dir, "tflite")
    with pytest.raises(MedmixError, match="is not a medmix run folder"):
        export_run(tmp_path / "nothing", "onnx")
    with pytest.raises(MedmixError, match="for seed 7"):
        export_run(run_dir, "onnx", seed=7)


def test_batch_dependent_fuser_is_refused(tmp_path, synth_store):
    run_dir, tensors = _run_folder(tmp_path, synth_store, "m3care")
    rows = _test_rows(synth_store, tensors)
    with pytest.raises(MedmixError, match="not per-patient"):
        export_run(run_dir, "torchscript", batch=tensors.batch(rows))


@pytest.mark.parametrize("fuser", ["adacomed", "teacher-only"])
def test_teacher_reading_fusers_are_refused(tmp_path, synth_store, fuser):
    run_dir, _ = _run_folder(tmp_path, synth_store, fuser)
    with pytest.raises(MedmixError, match="reads teacher-class embeddings"):
        export_run(run_dir, "onnx")


def test_per_patient_check_accepts_a_per_patient_fuser(tmp_path, synth_store):
    from medmix_core.export import FlatFuser

    run_dir, tensors = _run_folder(tmp_path, synth_store, "medmix")
    models, _ = load_run_models(run_dir)
    batch = tensors.batch(_test_rows(synth_store, tensors))
    check_per_patient(FlatFuser(models, ("probs",)).eval(),
                      flat_inputs(batch, models[0].spec), "medmix")


@pytest.mark.slow
@pytest.mark.parametrize("fuser", _exportable())
def test_onnx_export_parity_with_onnxruntime(tmp_path, synth_store, fuser):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run_dir, tensors = _run_folder(tmp_path, synth_store, fuser, seeds=(0, 1))
    rows = _test_rows(synth_store, tensors)
    path = export_run(run_dir, "onnx", batch=tensors.batch(rows[:16]))
    spec = load_run_models(run_dir)[0][0].spec
    got = onnx_predict(path, tensors.batch(rows), spec)  # 48 rows: the batch axis is dynamic
    want = _torch_mean(run_dir, tensors, rows)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=PARITY_ATOL, err_msg=k)
