"""Honest comparisons of a model, per image and per modality: quality at equal storage, and bytes on disk.

For every image (read and preprocessed as ``medlatent encode`` does):

* **the model** — encoded to the posterior mean ``z``, written as a latent file (float16 ``z`` only, no stage-2
  features), read back and decoded: exactly what a user stores and gets back. Its **bytes** are that file's size.
* **interpolation at the same f** — the image shrunk ÷``s`` per axis and enlarged back (bicubic in 2D,
  cubic-spline in 3D: :mod:`medlatent.evaluation.baselines`).
* **interpolation at equal values** — shrunk so that it keeps as many numbers as the latent. A latent of ``C``
  channels at ÷``s`` per axis keeps ``C·N/s^d`` values of an ``N``-pixel one-channel image; an interpolation at
  ÷``r`` keeps ``N/r^d``; equal when ``r = s / C^(1/d)`` (:func:`equal_values_factor`; ``f/C`` as a downsizing
  factor). Non-integer ``r`` rounds each shrunk axis to the nearest integer (the row's values are counted
  exactly). With ``C = 1`` this is the same-f row.
* **JPEG 2000 at the latent's bytes** — lossy JPEG 2000 at the largest size not above the latent file's bytes
  (:func:`medlatent.evaluation.codecs.j2k_at_bytes`).
* **bytes**: the source file(s), ``xz -9e`` of them and lossless JPEG 2000 of the pixels, against the latent file.

PSNR and MS-SSIM follow ``medlatent roundtrip``: both images mapped to [0, 1] by the image's intensity map
(:func:`medlatent.report.to_unit`), data range 1, on the original grid; volumes use 3D windows.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlatent.interpolation import EQUAL_VALUES_MODE, equal_values_factor
from medlatent.metrics import ms_ssim, psnr

if TYPE_CHECKING:
    from medlatent.evaluation.recon import EvalInput
    from medlatent.model.autoencoder import MedVAE

#: interpolation of the baselines per dimensionality
INTERP = EQUAL_VALUES_MODE
#: method keys of a row, in table order, with what a reader sees
METHODS = {"model": "model (latent file)", "interp_same_f": "interpolation, same f",
           "interp_equal_values": "interpolation, equal values", "j2k_at_latent_bytes": "JPEG 2000 at latent bytes"}


def _quality(truth: np.ndarray, other: np.ndarray, spatial_dims: int) -> dict[str, float]:
    return {"psnr": psnr(truth, other), "ms_ssim": ms_ssim(truth, other, spatial_dims=spatial_dims)}


def evaluate_image_honestly(item: "EvalInput", model: "MedVAE", *, modality: str = "auto",
                            j2k: bool = True) -> dict[str, Any]:
    """One image's row: quality of every method of :data:`METHODS` and the bytes (see the module docstring).

    Args:
        item: the input (a file, or a DICOM series), from :func:`~medlatent.evaluation.recon.gather_inputs`.
        model: the model, in eval mode.
        modality: ``auto`` or ct/mri/xray/other (as ``medlatent encode --modality``).
        j2k: add the JPEG 2000 rows (lossless bytes and lossy at the latent's bytes).
    """
    from medlatent.evaluation.codecs import CodecUnavailable, j2k_at_bytes, j2k_lossless, xz_bytes
    from medlatent.evaluation.recon import evaluate_image, interpolation_spec, load_input
    from medlatent.latentfile import read_latent, write_latent
    from medlatent.pipeline import EncodeOptions, decode_latent, encode_image
    from medlatent.report import to_unit

    d, s, C, f = model.spatial_dims, model.downsample_per_axis, model.C, model.f
    img = load_input(item)
    lf = encode_image(model, img, EncodeOptions(modality=modality, stage2=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_latent(Path(tmp) / "z.latent.safetensors", lf)
        latent_bytes = path.stat().st_size
        stored = read_latent(path)
    rec = stored.preprocessing
    decoded = decode_latent(model, stored, source=item.source, out_dtype="float32")
    original = np.asarray(img.array)
    truth = to_unit(original, rec)
    pixels = int(np.prod(img.spatial_shape))
    methods: dict[str, dict[str, Any]] = {
        "model": {**_quality(truth, to_unit(decoded.array, rec), d), "bytes": latent_bytes,
                  "values": int(stored.z.numel()), "f": f, "C": C}}

    mode = INTERP[d]
    specs = {"interp_same_f": (float(f), f"{mode} ÷{s} per axis")}
    eq = equal_values_factor(f, C, d)
    if eq is not None:
        g, r = eq
        specs["interp_equal_values"] = (g, f"{mode} ÷{r:.4g} per axis" + ("" if r.is_integer() else
                                                                           " (each axis rounded)"))
    built = {k: interpolation_spec(d, g, mode, model.config.in_channels, how) for k, (g, how) in specs.items()}
    ev = evaluate_image(img, model, built, modality=modality)
    for key, (g, how) in specs.items():
        m = ev.metrics[key]
        methods[key] = {"psnr": m["psnr"], "ms_ssim": m["ms_ssim"], "values": m["stored"], "f": g, "how": how}
    if "interp_equal_values" not in methods:
        methods["interp_equal_values"] = {**methods["interp_same_f"],
                                          "how": f"C={C} ≥ f: no interpolation keeps as few values"}

    sizes: dict[str, Any] = {"file": item.file_bytes, "xz": xz_bytes(item.paths), "latent": latent_bytes,
                             "j2k_lossless": None}
    notes: list[str] = []
    if j2k:
        try:
            sizes["j2k_lossless"] = j2k_lossless(original, d).nbytes
            lossy = j2k_at_bytes(original, d, latent_bytes)
            methods["j2k_at_latent_bytes"] = {**_quality(truth, to_unit(lossy.decoded, rec), d),
                                              "bytes": lossy.nbytes, "ratio": lossy.ratio,
                                              "over_budget": lossy.nbytes > latent_bytes}
        except CodecUnavailable as e:
            notes.append(f"no JPEG 2000: {e}")
    return {"image": item.name, "source": str(item.source), "modality": rec.modality, "dims": d,
            "shape": list(original.shape), "pixels": pixels, "bytes": sizes, "methods": methods, "notes": notes}


GROUP_COLUMNS = ("group", "source_modality")


def csv_groups(path: str | Path) -> dict[Path, str]:
    """Resolved image path → its group from a manifest CSV's ``group`` or ``source_modality`` column (paths
    relative to the CSV's folder); empty when the CSV has neither column. Lets mammograms and radiographs, both
    ``xray`` to the preprocessing, be summarised apart."""
    from medlatent.evaluation.recon import EvaluationInputError
    from medlatent.io.tables import read_csv_rows

    path = Path(path)
    try:
        columns, rows = read_csv_rows(path, lower=True)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvaluationInputError(f"{path}: cannot read the CSV ({e})") from e
    col = next((c for c in GROUP_COLUMNS if c in columns), None)
    if col is None or "path" not in columns:
        return {}
    return {(path.parent / r["path"]).resolve(): r[col] for _, r in rows if r.get("path") and r.get(col)}


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def summarise_honestly(rows: Sequence[Mapping[str, Any]], group_of: Mapping[str, str] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Per group (``group_of[image]``, else the row's modality) and over ``all``: mean PSNR / MS-SSIM per method,
    how many images the model beats each interpolation on (both metrics), summed bytes and the mean per-image
    ratios latent / xz and latent / lossless JPEG 2000."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((group_of or {}).get(r["image"], r["modality"]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, members in [*sorted(groups.items()), ("all", list(rows))]:
        entry: dict[str, Any] = {"images": len(members)}
        for key in METHODS:
            have = [r["methods"][key] for r in members if key in r["methods"]]
            if have:
                entry[key] = {k: _mean([m[k] for m in have]) for k in ("psnr", "ms_ssim")}
        for key in ("interp_same_f", "interp_equal_values"):
            entry[f"model_beats_{key}"] = sum(
                all(r["methods"]["model"][k] > r["methods"][key][k] for k in ("psnr", "ms_ssim")) for r in members)
        entry["bytes"] = {k: sum(r["bytes"][k] for r in members) if all(r["bytes"][k] is not None for r in members)
                          else None for k in ("file", "xz", "j2k_lossless", "latent")}
        entry["latent_over_xz"] = _mean([r["bytes"]["latent"] / r["bytes"]["xz"] for r in members])
        entry["latent_over_j2k_lossless"] = _mean([r["bytes"]["latent"] / r["bytes"]["j2k_lossless"]
                                                   for r in members if r["bytes"]["j2k_lossless"]])
        out[name] = entry
    return out


def _q(m: Mapping[str, Any] | None) -> str:
    if not m or m.get("psnr") is None:
        return "–"
    return f"{m['psnr']:.2f} / {m['ms_ssim']:.4f}"


def honest_tables(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, Any]]
                  ) -> list[tuple[str, list[dict[str, Any]]]]:
    """Markdown-ready tables (for :func:`medlatent.evaluation.report.write_report`): per group, per image
    quality, per image bytes."""
    per_group = [{"group": g, "images": e["images"], **{METHODS[k]: _q(e.get(k)) for k in METHODS},
                  "model wins vs equal values": f"{e['model_beats_interp_equal_values']}/{e['images']}",
                  "latent / xz (mean)": e["latent_over_xz"], "latent / lossless J2K (mean)":
                  e["latent_over_j2k_lossless"]} for g, e in summary.items()]
    quality = [{"image": r["image"], "modality": r["modality"],
                **{METHODS[k]: _q(r["methods"].get(k)) for k in METHODS},
                "equal values": r["methods"]["interp_equal_values"].get("how", "")} for r in rows]
    sizes = [{"image": r["image"], "file B": r["bytes"]["file"], "xz -9e B": r["bytes"]["xz"],
              "lossless J2K B": r["bytes"]["j2k_lossless"], "latent file B": r["bytes"]["latent"],
              "J2K lossy B": (r["methods"].get("j2k_at_latent_bytes") or {}).get("bytes"),
              "latent / xz": r["bytes"]["latent"] / r["bytes"]["xz"]} for r in rows]
    return [("Per modality (PSNR dB / MS-SSIM, means)", per_group), ("Per image (PSNR dB / MS-SSIM)", quality),
            ("Bytes on disk", sizes)]


def write_honest_report(out_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                        summary: Mapping[str, Mapping[str, Any]], models: Mapping[str, "MedVAE"],
                        extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results.json`` (models, every row, the summary and ``extra``) and ``report.md`` to ``out_dir``."""
    import json

    from medlatent.evaluation.digests import weights_sha256
    from medlatent.evaluation.recon_report import json_clean
    from medlatent.evaluation.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    described = {n: {"weights_sha256": weights_sha256(m), "f": m.f, "C": m.C, "spatial_dims": m.spatial_dims,
                     "downsample_per_axis": m.downsample_per_axis} for n, m in models.items()}
    files = {"json": out / "results.json"}
    files["json"].write_text(json.dumps(json_clean({"models": described, "images": list(rows), "summary": summary,
                                                     **(extra or {})}), indent=1) + "\n")
    notes = [
        "Models: " + "; ".join(f"`{n}` (SHA-256 {d['weights_sha256'][:12]}): {d['spatial_dims']}D, f = {d['f']} "
                               f"(÷{d['downsample_per_axis']} per axis), C = {d['C']}" for n, d in described.items()),
        "Quality: PSNR (dB) / MS-SSIM on [0, 1] by each image's intensity map, as `medlatent roundtrip` reports "
        "them; the model through a latent file read back. 'equal values': the interpolation keeps as many numbers "
        "as the latent (÷ s / C^(1/d) per axis, each axis rounded when that is not an integer). 'JPEG 2000 at "
        "latent bytes': lossy JPEG 2000 at the largest size not above the latent file's bytes.",
        "Bytes: the source file(s), `xz -9e` of them (gzip unpacked first), lossless JPEG 2000 of the pixels "
        "(volumes slice by slice), and the latent file (float16 z and its metadata header, no stage-2 features).",
    ]
    files["report"] = write_report(out, "Honest comparison: model against interpolation and codecs",
                                   honest_tables(rows, summary), notes=notes)
    return files
