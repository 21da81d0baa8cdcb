"""MONAI dictionary transforms: load latent files, encode images to latents and decode latents back, inside a
MONAI pipeline (``monai.transforms.Compose``). MONAI is optional and imported only here.

Each transform replaces ``d[key]`` and writes ``d[f"{key}_meta"]`` (:func:`~medlatent.data.latents.latent_meta`).
With ``keep_record=True`` it also keeps the :class:`~medlatent.latentfile.LatentFile` under
``d[f"{key}_latent"]``, which :class:`DecodeFromLatentd` needs to put a decoding back on the original grid and
units; leave it off for batches made by ``collate_fn`` (a record is not a tensor).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medlatent.data.latents import latent_meta, select_tensor
from medlatent.engine.tiled import TileSettings
from medlatent.io.image import ImageData
from medlatent.latentfile import LatentFile, read_latent
from medlatent.model.autoencoder import MedVAE
from medlatent.optional import import_optional
from medlatent.pipeline import EncodeOptions, decode_latent, encode_image

logger = logging.getLogger(__name__)

_monai_transforms = import_optional("monai.transforms", "medlatent's MONAI transforms",
                                    "pip install 'medlatent[eval]' (or pip install monai)")
MapTransform = _monai_transforms.MapTransform

RECORD = "_latent"
META = "_meta"


def _model(model: MedVAE | str | Path) -> MedVAE:
    return model if isinstance(model, MedVAE) else MedVAE.from_pretrained(str(model)).eval()


class LoadLatentd(MapTransform):
    """``d[key]``: path of a latent file → its ``z`` (or ``stage2``) as float32 ``C×…``, digests verified."""

    def __init__(self, keys: Hashable | Sequence[Hashable], tensor: str = "z", keep_record: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tensor, self.keep_record = tensor, keep_record

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(d[key])
            lf = read_latent(path)
            d[key] = select_tensor(lf, self.tensor, path)
            d[f"{key}{META}"] = latent_meta(lf, path.name, path)
            if self.keep_record:
                d[f"{key}{RECORD}"] = lf
        return d


class EncodeToLatentd(MapTransform):
    """``d[key]``: an image (a path any medlatent reader opens, or an :class:`ImageData`) → its latent ``z``
    (``C×…`` float32), preprocessed, tiled and encoded exactly as ``medlatent encode`` does.

    Args:
        model: a :class:`MedVAE`, or a name/folder for ``MedVAE.from_pretrained``.
        options: :class:`~medlatent.pipeline.EncodeOptions` (modality, tiles, precision, stage-2 features).
        tensor: ``"z"`` or ``"stage2"`` for ``d[key]``.
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], model: MedVAE | str | Path,
                 options: EncodeOptions | None = None, tensor: str = "z", keep_record: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.model, self.options = _model(model), options or EncodeOptions()
        self.tensor, self.keep_record = tensor, keep_record

    def _image(self, value: Any, key: Hashable) -> ImageData:
        if isinstance(value, ImageData):
            return value
        if isinstance(value, (str, Path)):
            from medlatent.io.readers import read_image

            return read_image(Path(value))
        raise TypeError(f"EncodeToLatentd: d[{key!r}] must be an image path or an ImageData (pixels with their "
                        f"affine), got {type(value).__name__}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = self._image(d[key], key)
            lf = encode_image(self.model, img, self.options)
            d[key] = select_tensor(lf, self.tensor, img.source or str(key))
            d[f"{key}{META}"] = latent_meta(lf, Path(img.source).name if img.source else "", img.source)
            if self.keep_record:
                d[f"{key}{RECORD}"] = lf
        return d


class DecodeFromLatentd(MapTransform):
    """``d[key]``: a latent ``z`` (``C×…``, e.g. one a generative model produced) → the image on the original grid
    and in the original units, using the record in ``d[f"{key}_latent"]`` (``keep_record=True`` upstream).

    ``d[f"{key}_meta"]["affine"]`` is the decoded image's affine. ``model`` defaults to the one the record names.
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], model: MedVAE | str | Path | None = None,
                 tiles: TileSettings | None = None, precision: str = "fp32", strict_weights: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.model = None if model is None else _model(model)
        self._by_name: dict[str, MedVAE] = {}
        self.tiles, self.precision, self.strict_weights = tiles, precision, strict_weights

    def _named(self, name: str) -> MedVAE:
        if name not in self._by_name:
            self._by_name[name] = _model(name)
        return self._by_name[name]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lf = d.get(f"{key}{RECORD}")
            if not isinstance(lf, LatentFile):
                raise KeyError(f"DecodeFromLatentd: no latent record under {key}{RECORD!s}; create it with "
                               "LoadLatentd(..., keep_record=True) or EncodeToLatentd(..., keep_record=True)")
            z = torch.as_tensor(d[key]).float().cpu()
            if tuple(z.shape) != tuple(lf.z.shape):
                raise ValueError(f"DecodeFromLatentd: d[{key!r}] has shape {tuple(z.shape)}, the latent record "
                                 f"{tuple(lf.z.shape)} (one item, C×…, no batch axis)")
            model = self.model or self._named(str(lf.model["name"]))
            img = decode_latent(model, dataclasses.replace(lf, z=z), source=str(key), precision=self.precision,
                                strict_weights=self.strict_weights, tiles=self.tiles)
            d[key] = torch.from_numpy(img.array)
            meta = dict(d.get(f"{key}{META}") or latent_meta(lf))
            meta["affine"] = torch.from_numpy(img.affine.astype("float64"))
            d[f"{key}{META}"] = meta
        return d
