"""The ``data`` section of a training configuration: where the images are and how samples are cut from them.

Each field's annotation is its rule (checked by pydantic when the section is built, see
:mod:`medlatent.training.options`); an :class:`~medlatent.training.dataset.ImageDataset` cuts its samples by
the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from annotated_types import Ge, Interval
from pydantic import AfterValidator, BeforeValidator, NonNegativeInt

from medlatent.training.options import check_fields, check_keys, option

Mode = Literal["random_crop", "resize", "random_resized_crop", "multiscale"]
Modality = Literal["auto", "ct", "mri", "xray", "other"]
MODES: tuple[str, ...] = get_args(Mode)
MODALITIES: tuple[str, ...] = get_args(Modality)
# random_resized_crop: the default range of the square crop's side, as a fraction of the image's short side
RESIZED_CROP_SIDE = (0.5, 1.0)


class DataError(ValueError):
    """Training data that cannot be used; the message names the CSV, row or file and what to do."""


def normalise_val(value: Any) -> str | None:
    """``data.val`` as ``"auto"``, a source path, or None for no validation (``none``, null or empty)."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "none", "null", "false"):
        return None
    return "auto" if text.lower() == "auto" else text


def _source(value: Any) -> str:
    return "" if value is None else str(value)  # a Path, or unset (build_datasets refuses an empty one)


def _fraction_pair(pair: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 < pair[0] <= pair[1] <= 1.0:
        raise ValueError("must satisfy 0 < low ≤ high ≤ 1 (fractions of the short side)")
    return pair


def _percentile_pair(pair: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= pair[0] < pair[1] <= 100.0:
        raise ValueError("must be (low, high) with 0 ≤ low < high ≤ 100")
    return pair


@dataclass
class DataConfig:
    """Where the training images are and how they are cut into training samples (the ``data`` section).

    The annotations are the rules (checked by pydantic when the section is built, :func:`check_fields`);
    an :class:`ImageDataset` cuts its samples by the same object.
    """

    train: Annotated[str, BeforeValidator(_source)] = option(
        help="REQUIRED. A folder (walked recursively; DICOM series become volumes) or a CSV manifest with columns "
             "`path` (relative to the CSV's folder), optional `split` (train/val/test) and `modality` "
             "(ct/mri/xray/other). A CSV with a `split` column trains on its `train` rows.")
    val: Annotated[str | None, BeforeValidator(normalise_val)] = option(
        "auto", "Validation images: `auto` (a CSV's `val` rows when it has a split column, else a seeded "
                "`val_fraction` of the training files, held out from training and listed in `val_split.txt`); a "
                "folder or CSV (its `val` rows when it has a split column); or `none` (also null) for no "
                "validation.")
    val_fraction: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.1, "With `val: auto` and no split column: the fraction of training files held out for validation (at "
             "least one file when there are two or more; 0 holds none out).")
    spatial_dims: Literal[2, 3] = option(2, "2 or 3 (the model's).")
    in_channels: Literal[1, 3] = option(1, "The model's input channels (1 or 3); RGB files are averaged for 1, "
                                           "gray repeated for 3.")
    size: Annotated[int, Ge(2)] = option(256, "Crop side (2D) or cubic patch side (3D; 64 in the paper); a multiple "
                                              "of the model's reduction.")
    mode: Mode = option("random_crop", "2D only: `random_crop` (native resolution), `resize` (whole image to "
                                       "size×size, as the official 2D fine-tuning), `random_resized_crop` or "
                                       "`multiscale` (native-resolution crops to the downscaled whole image). 3D "
                                       "always uses random patches.")
    crop_side: Annotated[tuple[float, float], AfterValidator(_fraction_pair)] = option(
        RESIZED_CROP_SIDE, "`random_resized_crop` only: range of the crop's side as a fraction of the image's "
                           "short side (uniform).")
    flips: bool = option(True, "Random flips (2D: horizontal and vertical; 3D: each axis), training only.")
    invert: Annotated[float, Interval(ge=0.0, le=1.0)] = option(
        0.0, "Probability of inverting a training sample's intensities (x → −x).")
    modality: Modality = option("auto", "`auto` (from the file) or ct/mri/xray/other for every image without a "
                                        "CSV modality.")
    mri_percentiles: Annotated[tuple[float, float], AfterValidator(_percentile_pair)] | None = option(
        None, "Clip 3D MRI to these percentiles before min–max, as at inference (null: plain min–max).")
    slices_from_volumes: bool = option(True, "2D only: 3D files give random 2D slices (else a 3D file is an "
                                             "error).")
    cache: bool = option(True, "Keep each preprocessed image in memory (per loader worker); 4 bytes per "
                               "pixel/voxel per worker.")
    num_workers: NonNegativeInt = option(2, "Data loader processes (0: load in the training process).")
    pad_value: Annotated[float, Interval(ge=-1.0, le=1.0)] = option(
        -1.0, "Value of the padding around images smaller than the crop (-1: the bottom of the range).")

    def __post_init__(self) -> None:
        check_fields(self, "data", DataError)
        if self.spatial_dims == 3 and self.mode != "random_crop":
            raise DataError(f"data.mode {self.mode!r} is for 2D data; 3D training always uses random cubic patches "
                            "(leave it at random_crop)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from plain values (JSON/YAML); an unknown key is an error that names the closest valid key."""
        check_keys(cls, d, "", DataError)
        return cls(**d)

