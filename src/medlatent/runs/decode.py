"""Decode latent files back to images on the original grid, orientation and intensity units."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

from medlatent.batch import MANIFEST, Job
from medlatent.engine.tiled import TileSettings
from medlatent.io.image import ImageData
from medlatent.io.writers import output_suffix, write_image
from medlatent.latentfile import LatentFile, read_latent, read_latent_header
from medlatent.model.autoencoder import MedVAE
from medlatent.pipeline import decode_latent, model_record
from medlatent.runs.common import RunListener, RunResult, find_inputs, record_skipped, run_batch
from medlatent.runs.models import ModelLoadError, check_run_options, compile_model, deployed, load_model

DecodeOne = Callable[[LatentFile, Path], tuple[MedVAE, ImageData]]


class DecoderCache:
    """The decoder of each latent: the model given, else the one named in the latent file, each loaded once.

    A model that fails to load is remembered, so that the next latent of that model fails at once instead of
    asking the Hub again.
    """

    def __init__(self, model: str | Path | None, checkpoint: Path | None, provide: str | None = None,
                 listener: RunListener | None = None) -> None:
        self.model, self.checkpoint, self.provide = model, checkpoint, provide
        self.listener = listener or RunListener()
        self._cache: dict[tuple, MedVAE | ModelLoadError] = {}

    def for_latent(self, lf: LatentFile) -> MedVAE:
        name = cast("str | Path", self.model or lf.model.get("name"))  # a read latent names its model
        key = (name, self.checkpoint)
        if key not in self._cache:
            try:
                self._cache[key] = load_model(name, self.checkpoint, provide=self.provide)
                self.listener.model_loaded(str(name), "given" if self.model else "named in the latent file")
            except ModelLoadError as e:
                self._cache[key] = ModelLoadError(f"cannot load model {name!r} named in the latent file: {e} "
                                                  "(pass --model NAME|DIR to choose the decoder)")
        got = self._cache[key]
        if isinstance(got, ModelLoadError):
            raise ModelLoadError(str(got))
        return got


def decode_files(latents: list[Path], output: Path, *, model: str | Path | None = None,
                 checkpoint: Path | None = None, fmt: str | None = None, template: Path | None = None,
                 keep_study: bool = False, device: str = "cpu", precision: str = "fp32", ignore_weights: bool = False,
                 resume: bool = True, tiles: TileSettings | None = None, compile: bool = False,
                 provide: str | None = None, listener: RunListener | None = None,
                 backend: str = "torch") -> RunResult:
    """Decode latent files into ``output/<name><suffix>``.

    Args:
        model: the decoder for every latent; ``None``: the model named in each latent file.
        fmt: nifti, png, tiff, npy or dicom (default: nifti for 3D and NIfTI sources, png for 2D); dicom writes a
            derived series, a folder per volume and a file per 2D image.
        template: ``fmt="dicom"``: the source DICOM (a file, or the folder given to encode) whose patient and study
            attributes are copied; without it the files hold no identifiers.
        keep_study: ``fmt="dicom"``: keep the template's StudyInstanceUID.
        ignore_weights: decode even if the weights differ from the encoder's.
        backend: ``torch``, ``onnxruntime`` or ``openvino`` (see :func:`medlatent.runs.encode.encode_files`).

    Raises:
        RunError: the output is unusable, the inputs hold no latent files, or the output stops taking writes.
    """
    listener = listener or RunListener()
    check_run_options(backend, precision, device, compile, tiles.norm if tiles else "tile")
    found = find_inputs(latents, output, verb="decode")
    files = [(it.name, it.paths[0]) for it in found.items]
    decoders = DecoderCache(model, checkpoint, provide, listener)
    ready: dict[int, MedVAE] = {}  # the cached decoders live for the run, so their ids stay theirs

    def decode_one(lf: LatentFile, path: Path) -> tuple[MedVAE, ImageData]:
        """The decoder used and the decoded image."""
        torch_net = compile_model(decoders.for_latent(lf).to(device), compile)
        if id(torch_net) not in ready:  # deployed once per model: the weights digest reads every tensor
            ready[id(torch_net)] = deployed(torch_net, backend, precision)
        net = ready[id(torch_net)]
        return net, decode_latent(net, lf, source=path, precision=precision, strict_weights=not ignore_weights,
                                  tiles=tiles)

    def make_job(name: str, path: Path) -> Job:
        if fmt == "dicom":
            return _dicom_job(name, path, output, template, keep_study, decode_one)
        # the suffix depends on the latent (2D/3D) when no format is given: read the header only (no tensors);
        # a damaged file fails later, in the job, with its reason
        out_fmt = fmt
        if out_fmt is None:
            try:
                rec = read_latent_header(path)[0]  # NIfTI sources (e.g. X×Y×1) go back to NIfTI
                out_fmt = "nifti" if rec.spatial_dims == 3 or rec.file_geometry else "png"
            except Exception:
                out_fmt = "nifti"
        target = output / (name + output_suffix(out_fmt))

        def run(lf: LatentFile) -> dict:
            img = decode_one(lf, path)[1]
            write_image(img, target, out_fmt)
            return {"shape": list(img.array.shape)}

        return Job(name, [target], lambda: read_latent(path), run)

    report = run_batch(listener, "decoding", [make_job(n, p) for n, p in files], output, resume=resume)
    skipped = found.failed + found.empty
    record_skipped(output, skipped, MANIFEST)
    return RunResult(output, report, skipped, [], len(report.failed) + len(skipped))


def _dicom_job(name: str, path: Path, output: Path, template: Path | None, keep_study: bool,
               decode_one: DecodeOne) -> Job:
    """A job that decodes one latent into a derived DICOM file (2D) or series folder (3D)."""
    from medlatent._version import __version__
    from medlatent.io.dicom_out import Derivation, dicom_output_path, find_template, write_dicom

    try:
        dims = read_latent_header(path)[0].spatial_dims
    except Exception:  # a damaged file fails in the job, with its reason
        dims = 2
    target = dicom_output_path(output, name, dims)

    def run(lf: LatentFile) -> dict:
        source = find_template(template, name) if template is not None else None
        net, img = decode_one(lf, path)
        rec = model_record(net)
        write_dicom(img, target, Derivation(rec["name"], rec["weights_sha256"], __version__), template=source,
                    keep_study=keep_study)
        return {"shape": list(img.array.shape), **({"template": str(source)} if source else {})}

    return Job(name, [target], lambda: read_latent(path), run)
