"""Text-model extraction throughput against this machine's limit, before and after.

For each text model (``minilm``: all-MiniLM-L6-v2, ``mpnet``: all-mpnet-base-v2) and each
text set (``physionet``: the bundled stays serialised as the sentence experts read them;
``reports``: OpenI-like radiology reports made up from a phrase list, some longer than the
256-token limit), the unique texts are embedded with a cold cache by

* ``legacy``: the loop ``TextModel.embed`` ran before (kept here as :func:`legacy_embed`):
  tokenise all texts to sort them, tokenise each batch again with padding, copy each
  batch's embeddings back to the host;
* ``count``: the current path with batches of ``--batch-size`` texts (the CPU default);
* ``tokens=N``: the current path with batches of at most N padded tokens (``--max-tokens``);

and reported as texts/s, tokens/s (real, non-pad tokens and padded tokens, i.e. what the
model computes), FLOP/s and the fraction of this machine's peak: on CPU the same run's best
``torch.mm`` rate on 2048 x 2048 fp32 matrices, on CUDA the bf16 ``torch.mm`` rate on 8192 x
8192 matrices (the text models run under bf16 autocast there). FLOPs per token are
``2 x (Linear weights of the encoder)`` plus the attention term ``4 x T x hidden`` per layer
(QK^T and AV over a padded length T), counted per batch; fvcore's count on one batch is
printed beside it as a check. Every row also gives the largest absolute difference of its
embeddings from ``legacy``.

A second, synchronised pass of each path charges the time to stages: tokenisation,
padding/collation (Python), host-to-device copies, the model forward, pooling and the copy
back; ``serialise`` is the sentence expert's own text-making for the physionet set, and the
fixed cost per forward (Python, kernel launches, one read of the weights) is the forward
time of a single 5-token text. For minilm on the physionet stays, the padding and forwards
of ``extract()``'s call pattern (payloads per ``encode`` call, texts sorted within a call)
are counted before and after, and the whole pattern is timed both ways.

With ``--image`` a BiomedCLIP-architecture ViT-B/16 image tower with random weights
(``medmix_experts.foundation.vit``, the real layer sizes) is timed on 224 x 224 inputs:
images/s of the forward, and its fraction of the same peak.

Usage:
    python benchmarks/bench_throughput.py [--models minilm,mpnet] [--sets physionet,reports]
        [--stays 300] [--reports 200] [--minilm-texts 400] [--mpnet-texts 120]
        [--batch-size 64] [--max-tokens 4096,16384] [--device cpu] [--image]
        [--no-extract-calls] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmix_core.errors import MedmixError

STAGES = ("tokenise", "collate", "to_device", "forward", "pool", "copy_back")


# ---------------------------------------------------------------------------- the old path
def legacy_embed(tm, texts: Sequence[str], batch_size: int = 64,
                 timings: dict[str, float] | None = None) -> np.ndarray:
    """The loop of ``TextModel.embed`` before tokenise-once batching, without its cache.

    Args:
        tm: a ``medmix_experts.textmodel.TextModel``.
        texts: N distinct strings.
        batch_size: texts per forward pass.
        timings: when given, seconds per stage are added to it (device synchronised).
    Returns:
        float32 ``[N, dim]``, rows in the order of ``texts``.
    """
    from medmix_experts.textmodel import autocast_for

    clock = _Clock(tm.device, timings)
    embs = np.zeros((len(texts), tm.dim), dtype=np.float32)  # [N, dim]
    ids = tm.tokenizer(list(texts), truncation=True, max_length=tm.max_length)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    clock.lap("tokenise")
    with torch.inference_mode(), autocast_for(tm.device):
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            enc = tm.tokenizer([texts[r] for r in rows], padding=True, truncation=True,
                               max_length=tm.max_length, return_tensors="pt")
            clock.lap("tokenise")
            enc = {k: v.to(tm.device) for k, v in enc.items()}
            clock.lap("to_device")
            hidden = tm.model(input_ids=enc["input_ids"],
                              attention_mask=enc["attention_mask"]).last_hidden_state
            clock.lap("forward")
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, dim]
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            clock.lap("pool")
            embs[rows] = pooled.float().cpu().numpy()
            clock.lap("copy_back")
    return embs


class _Clock:
    def __init__(self, device: str, timings: dict[str, float] | None) -> None:
        self.device, self.timings, self.t = device, timings, time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
        self.t = now


# ---------------------------------------------------------------------------- peak, FLOPs
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_rate(device: str, repeats: int = 5) -> dict[str, Any]:
    """Best-of-``repeats`` dense ``torch.mm`` rate: fp32 2048^2 on CPU, bf16 8192^2 on CUDA."""
    cuda = device.startswith("cuda")
    size, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)  # [S, S]
    b = torch.randn(size, size, device=device, dtype=dtype)  # [S, S]
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    flops = 2.0 * float(size) ** 3
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "best_s": best,
            "flops_per_s": flops / best}


def model_shape(tm) -> dict[str, int]:
    """Encoder Linear weights (the matmul FLOPs are 2 x this per token), layers, hidden."""
    enc = tm.model.encoder
    linear = sum(m.weight.numel() for m in enc.modules() if isinstance(m, torch.nn.Linear))
    layers = len(enc.layer)
    return {"linear_weights": int(linear), "layers": int(layers), "hidden": int(tm.dim)}


def batch_flops(shape: dict[str, int], rows: int, width: int) -> float:
    """FLOPs of one forward over ``rows`` texts padded to ``width`` tokens."""
    tokens = rows * width
    matmul = 2.0 * shape["linear_weights"] * tokens
    attention = 4.0 * width * shape["hidden"] * shape["layers"] * tokens  # QK^T and AV
    return matmul + attention


def fvcore_flops(tm, texts: Sequence[str]) -> dict[str, Any]:
    """fvcore's count (it counts one multiply-add as one flop) on one padded batch."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as exc:
        return {"error": f"fvcore not importable: {exc}"}
    enc = tm.tokenizer(list(texts), padding=True, truncation=True, max_length=tm.max_length,
                       return_tensors="pt")
    ids = enc["input_ids"].to(tm.device)  # [b, T]
    mask = enc["attention_mask"].to(tm.device)  # [b, T]
    try:
        with torch.inference_mode():
            fca = FlopCountAnalysis(tm.model, (ids, mask))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            macs = float(fca.total())
    except Exception as exc:  # noqa: BLE001 - a tracing failure is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"rows": int(ids.shape[0]), "width": int(ids.shape[1]),
            "flops_per_padded_token": 2.0 * macs / ids.numel()}


# ---------------------------------------------------------------------------- texts
_FINDINGS = [
    "The heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
    "Mild cardiomegaly is again noted.", "The lungs are clear.",
    "There is no focal airspace consolidation.", "No pleural effusion or pneumothorax.",
    "Small bilateral pleural effusions are present.",
    "There is patchy opacity in the right lower lobe which may represent atelectasis or "
    "early pneumonia in the appropriate clinical setting.",
    "Degenerative changes of the thoracic spine.", "Calcified granuloma in the left upper lobe.",
    "Interval placement of a right internal jugular central venous catheter with tip in the "
    "lower superior vena cava.", "Surgical clips project over the right upper quadrant.",
    "Pulmonary vascularity is within normal limits.",
    "Hyperexpanded lungs consistent with chronic obstructive pulmonary disease.",
    "Streaky bibasilar opacities likely reflect subsegmental atelectasis.",
    "No acute bony abnormality.", "Stable appearance of the chest compared with 2 prior exams.",
]
_IMPRESSIONS = ["No acute cardiopulmonary abnormality.", "No active disease.",
                "Findings suggest mild pulmonary edema.", "Right lower lobe pneumonia.",
                "Stable chest radiograph.", "Cardiomegaly without acute process."]


def report_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` OpenI-like reports (findings + impression), 1 to 40 sentences, some repeated."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 14, 20, 40])
        body = " ".join(rng.choice(_FINDINGS) for _ in range(k))
        out.append(f"FINDINGS: {body} IMPRESSION: {rng.choice(_IMPRESSIONS)}")
    return out


def physionet_texts(n_stays: int) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Texts ``minilm`` reads for the first ``n_stays`` stays, per modality in stay order,
    and the seconds spent fitting the serialiser and serialising."""
    from medmix_experts.sentence import MiniLMExpert

    from medmix_core.plugins import get_dataset

    ds = get_dataset("physionet2012")()
    samples = ds.samples()[:n_stays]
    expert = MiniLMExpert()
    texts: dict[str, list[str]] = {}
    fit_s = ser_s = 0.0
    for m in ds.modalities():
        payloads = [s.modalities[m.name] for s in samples if s.modalities.get(m.name)]
        if not payloads:
            continue
        t0 = time.perf_counter()
        expert.fit(m, payloads)
        t1 = time.perf_counter()
        texts[m.name] = expert.texts(m, payloads)
        fit_s += t1 - t0
        ser_s += time.perf_counter() - t1
    n = sum(map(len, texts.values()))
    return texts, {"stays": len(samples), "texts": n, "fit_s": fit_s,
                   "serialise_s": ser_s, "serialise_texts_per_s": n / ser_s}


# ---------------------------------------------------------------------------- extract calls
def _calls(by_modality: dict[str, list[str]], chunk: int) -> list[list[str]]:
    """The texts of each ``encode`` call ``extract`` makes with ``chunk`` payloads a call."""
    return [texts[s:s + chunk] for texts in by_modality.values()
            for s in range(0, len(texts), chunk)]


def padding_plan(tm, by_modality: dict[str, list[str]]) -> dict[str, Any]:
    """Padding and forwards of the extract() call pattern, before and after (tokens only):
    each call's new distinct texts sorted by length, as the text-model cache leaves them."""
    from medmix_experts.textmodel import CUDA_MAX_TOKENS, plan_batches

    cfgs = {"before: 256 payloads/call, 64 texts/batch": (256, 64, 0),
            "after, CPU: 1024 payloads/call, 64 texts/batch": (1024, 64, 0),
            f"after, CUDA: 1024 payloads/call, {CUDA_MAX_TOKENS} tokens/batch": (
                1024, 4096, CUDA_MAX_TOKENS)}
    out = {}
    for label, (chunk, bs, mt) in cfgs.items():
        real = padded = forwards = 0
        seen: set[str] = set()
        for call in _calls(by_modality, chunk):
            new = sorted(set(call) - seen)
            seen |= set(call)
            if not new:
                continue
            ids = tm.tokenizer(new, truncation=True, max_length=tm.max_length)["input_ids"]
            lengths = np.sort(np.array([len(x) for x in ids]))[::-1]
            for a, b in plan_batches(lengths, bs, mt):
                real += int(lengths[a:b].sum())
                padded += (b - a) * int(lengths[a])
                forwards += 1
        out[label] = {"real_tokens": real, "padded_tokens": padded, "forwards": forwards,
                      "padding_fraction": 1 - real / padded}
        print(f"  {label}: {forwards} forwards, {real} real / {padded} padded tokens "
              f"({100 * (1 - real / padded):.1f}% padding)")
    return out


def extract_calls(tm, by_modality: dict[str, list[str]], batch_size: int) -> dict[str, Any]:
    """The minilm side of extract(): legacy loop on 256-payload calls vs ``embed`` on
    1,024-payload calls, each with a cold cache (the legacy side emulates the cache)."""
    out = {}
    n = sum(map(len, by_modality.values()))
    ref: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for call in _calls(by_modality, 256):
        new = sorted(set(call) - set(ref))
        if new:
            for t, e in zip(new, legacy_embed(tm, new, batch_size)):
                ref[t] = e
    _sync(tm.device)
    out["before"] = time.perf_counter() - t0
    tm._cache.clear()
    got: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for call in _calls(by_modality, 1024):
        for t, e in zip(call, tm.embed(call, batch_size=batch_size)):
            got[t] = e
    _sync(tm.device)
    out["after"] = time.perf_counter() - t0
    tm._cache.clear()
    diff = max(float(np.abs(got[t] - ref[t]).max()) for t in ref)
    res = {"texts": n, "distinct": len(ref), "before_s": out["before"],
           "after_s": out["after"], "before_texts_per_s": n / out["before"],
           "after_texts_per_s": n / out["after"], "speed_up": out["before"] / out["after"],
           "max_abs_diff": diff}
    print(f"  extract() calls, {n} texts ({len(ref)} distinct): before {out['before']:.2f} s "
          f"= {res['before_texts_per_s']:.1f} texts/s, after {out['after']:.2f} s = "
          f"{res['after_texts_per_s']:.1f} texts/s (x{res['speed_up']:.2f}); max abs diff "
          f"{diff:.1e}")
    return res


# ---------------------------------------------------------------------------- one model
def run_model(label: str, tm, texts: list[str], args, peak: float) -> dict[str, Any]:
    """Every path over ``texts`` (distinct strings) with model ``tm``."""
    device = tm.device
    shape = model_shape(tm)
    ids = tm.tokenizer(texts, truncation=True, max_length=tm.max_length)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    n_trunc = tm.n_truncated(texts)
    sorted_len = lengths[np.argsort(-lengths, kind="stable")]
    from medmix_experts.textmodel import plan_batches

    paths: dict[str, dict[str, Any]] = {"legacy": {"max_tokens": 0}, "count": {"max_tokens": 0}}
    for mt in args.max_tokens:
        paths[f"tokens={mt}"] = {"max_tokens": mt}
    print(f"-- {label}: {len(texts)} texts, tokens min/median/max {lengths.min()}/"
          f"{int(np.median(lengths))}/{lengths.max()}, {n_trunc} truncated at "
          f"{tm.max_length}; {shape['linear_weights'] / 1e6:.2f} M encoder Linear weights, "
          f"{shape['layers']} layers")
    fv = fvcore_flops(tm, texts[:8])
    if "error" in fv:
        print(f"  fvcore: {fv['error']}")
    else:
        mine = batch_flops(shape, fv["rows"], fv["width"]) / (fv["rows"] * fv["width"])
        print(f"  FLOPs per padded token on one {fv['rows']} x {fv['width']} batch: "
              f"{mine / 1e6:.2f} M (2 x Linear weights + attention), fvcore "
              f"{fv['flops_per_padded_token'] / 1e6:.2f} M")
        fv["ours_per_padded_token"] = mine
    warm = texts[:min(len(texts), args.batch_size)]
    tm.embed_uncached(warm, batch_size=args.batch_size)  # first-call allocations
    # fixed cost of a forward: one 5-token text (Python and kernel launches, and reading
    # every weight once, which bounds a tiny forward by memory bandwidth)
    one = tm.tokenizer(["heart rate normal"], return_tensors="pt")  # [1, 5]
    with torch.inference_mode():
        x, m = one["input_ids"].to(device), one["attention_mask"].to(device)
        tm.model(input_ids=x, attention_mask=m)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            tm.model(input_ids=x, attention_mask=m)
        _sync(device)
        per_forward = (time.perf_counter() - t0) / 5
    def go(name, timings=None):
        if name == "legacy":
            return legacy_embed(tm, texts, args.batch_size, timings)
        return tm.embed_uncached(texts, batch_size=args.batch_size,
                                 max_tokens=paths[name]["max_tokens"], timings=timings)

    # the paths alternate, best of --repeats: a shared machine's load hits them alike
    walls: dict[str, float] = {}
    embs: dict[str, np.ndarray] = {}
    for _ in range(max(1, args.repeats)):
        for name in paths:
            _sync(device)
            t0 = time.perf_counter()
            embs[name] = go(name)
            _sync(device)
            walls[name] = min(walls.get(name, float("inf")), time.perf_counter() - t0)
    ref = embs["legacy"]
    rows_out = {}
    for name, cfg in paths.items():
        spans = plan_batches(sorted_len, args.batch_size, cfg["max_tokens"])
        padded = sum((e - s) * int(sorted_len[s]) for s, e in spans)
        flops = sum(batch_flops(shape, e - s, int(sorted_len[s])) for s, e in spans)
        real = int(lengths.sum())
        wall = walls[name]
        stages: dict[str, float] = {}
        if name in ("legacy", "count"):
            go(name, stages)
        diff = float(np.abs(embs[name] - ref).max())
        r = {"wall_s": wall, "batches": len(spans), "texts_per_s": len(texts) / wall,
             "real_tokens_per_s": real / wall, "padded_tokens_per_s": padded / wall,
             "padding_fraction": 1 - real / padded, "flops": flops,
             "flops_per_s": flops / wall, "fraction_of_peak": flops / wall / peak,
             "useful_fraction_of_peak": flops * real / padded / wall / peak,
             "stages_s": stages, "fixed_cost_s": per_forward * len(spans),
             "max_abs_diff_vs_legacy": diff}
        rows_out[name] = r
        st = (", ".join(f"{k} {stages.get(k, 0.0):.2f}" for k in STAGES) if stages
              else "not run")
        print(f"  {name:>13}: {wall:6.2f} s, {r['texts_per_s']:7.1f} texts/s, "
              f"{r['real_tokens_per_s']:8.0f} real / {r['padded_tokens_per_s']:8.0f} padded "
              f"tokens/s ({100 * r['padding_fraction']:.1f}% pad, {len(spans)} batches), "
              f"{r['flops_per_s'] / 1e9:6.1f} GFLOP/s = {100 * r['fraction_of_peak']:.1f}% "
              f"of peak; diff {diff:.1e}")
        print(f"  {'':>13}  stages (synchronised pass, s): {st}; fixed cost per forward "
              f"~{r['fixed_cost_s']:.2f} s ({1e3 * per_forward:.1f} ms x {len(spans)} "
              f"forwards)")
    avg_width = float(np.mean([int(sorted_len[s]) for s, _ in
                               plan_batches(sorted_len, args.batch_size, 0)]))
    return {"texts": len(texts), "tokens_real": int(lengths.sum()),
            "truncated": int(n_trunc), "shape": shape,
            "flops_per_token_at_mean_width": batch_flops(shape, 1, int(avg_width)) / avg_width,
            "fvcore": fv, "fixed_cost_per_forward_s": per_forward, "paths": rows_out}


# ---------------------------------------------------------------------------- image
def run_image(args, peak: float, device: str) -> dict[str, Any]:
    """A random ViT-B/16 (BiomedCLIP's image tower shape) on 224 x 224 inputs."""
    from medmix_experts.foundation.vit import OpenClipTimmVisual, TimmViTTrunk

    trunk = TimmViTTrunk(width=768, depth=12, num_heads=12, patch=16, grid=14, mlp_hidden=3072)
    net = OpenClipTimmVisual(trunk, 512).to(device).eval()
    n_linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    tokens = 1 + (224 // 16) ** 2
    patch = 3 * 16 * 16 * 768 * (224 // 16) ** 2
    flops = 2.0 * (n_linear * tokens + patch) + 4.0 * tokens * tokens * 768 * 12
    out = {"flops_per_image": flops}
    for bs in args.image_batches:
        x = torch.randn(bs, 3, 224, 224, device=device)  # [B, 3, 224, 224]
        with torch.inference_mode():
            net(x)
            _sync(device)
            t0 = time.perf_counter()
            net(x)
            _sync(device)
            wall = time.perf_counter() - t0
        rate = bs / wall
        out[f"batch={bs}"] = {"images_per_s": rate, "fraction_of_peak": rate * flops / peak}
        print(f"  ViT-B/16 (random), batch {bs}: {rate:.2f} images/s, "
              f"{rate * flops / 1e9:.1f} GFLOP/s = {100 * rate * flops / peak:.1f}% of peak")
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    # imported here, so that tests can import legacy_embed without the profiling stack
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import add_common_args, setup, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,mpnet")
    p.add_argument("--sets", default="physionet,reports")
    p.add_argument("--stays", type=int, default=300,
                   help="physionet stays serialised (and embedded in extract()'s call "
                        "pattern by minilm)")
    p.add_argument("--reports", type=int, default=200, help="OpenI-like reports made")
    p.add_argument("--minilm-texts", type=int, default=400,
                   help="minilm paths see a random N of each set's distinct texts (0 = all)")
    p.add_argument("--mpnet-texts", type=int, default=120,
                   help="mpnet paths see a random N of each set's distinct texts (0 = all)")
    p.add_argument("--no-extract-calls", action="store_true",
                   help="skip the extract() call-pattern comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed passes of each path, alternating paths; the best is kept")
    p.add_argument("--max-tokens", type=_ints, default=[4096, 16384],
                   help="token budgets to time, comma-separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image", action="store_true", help="also time a random ViT-B/16")
    p.add_argument("--image-batches", type=_ints, default=[1, 8])
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, "text-model extraction throughput")
    from medmix_experts.textmodel import load_text_model, minilm_dir, mpnet_dir

    peak = peak_rate(args.device)
    print(f"device {args.device}; peak: torch.mm {peak['size']}^2 {peak['dtype']} best "
          f"{1e3 * peak['best_s']:.1f} ms = {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
    sets: dict[str, list[str]] = {}
    result: dict[str, Any] = {"machine": info, "device": args.device, "peak": peak,
                              "args": {k: str(v) for k, v in vars(args).items()}}
    by_modality: dict[str, list[str]] = {}
    if "physionet" in args.sets:
        by_modality, ser = physionet_texts(args.stays)
        sets["physionet"] = sorted({t for v in by_modality.values() for t in v})
        result["serialise"] = ser
        print(f"physionet: {ser['stays']} stays -> {ser['texts']} texts "
              f"({len(sets['physionet'])} distinct); serialiser fit {ser['fit_s']:.2f} s, "
              f"serialise {ser['serialise_s']:.2f} s = {ser['serialise_texts_per_s']:.0f} "
              f"texts/s")
    if "reports" in args.sets:
        sets["reports"] = sorted(set(report_texts(args.reports)))
    folders = {"minilm": minilm_dir, "mpnet": mpnet_dir}
    result["models"] = {}
    for model in [m for m in args.models.split(",") if m]:
        try:
            tm = load_text_model(str(folders[model]()), False, 256).to(args.device)
        except (MedmixError, KeyError) as exc:
            print(f"-- {model}: skipped ({exc})")
            result["models"][model] = {"skipped": str(exc)}
            continue
        if model == "minilm" and by_modality:
            print("-- minilm: extract()'s call pattern on the physionet stays")
            result["padding_plan"] = padding_plan(tm, by_modality)
            if not args.no_extract_calls:
                result["extract_calls"] = extract_calls(tm, by_modality, args.batch_size)
        limit = args.mpnet_texts if model == "mpnet" else args.minilm_texts
        for set_name, texts in sets.items():
            if limit and len(texts) > limit:
                pick = np.random.default_rng(0).choice(len(texts), limit, replace=False)
                texts = [texts[i] for i in sorted(pick)]
            result["models"][f"{model}/{set_name}"] = run_model(f"{model} on {set_name}", tm,
                                                                texts, args,
                                                                peak["flops_per_s"])
    if args.image:
        print("-- image tower")
        result["image"] = run_image(args, peak["flops_per_s"], args.device)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
