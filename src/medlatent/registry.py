"""The MedVAE family, each member declared once: architecture next to its weight metadata.

Names follow the official release: ``medvae_{s}_{C}_{2d|3d}`` where ``s`` is the reduction per axis and
``C`` the latent channels. ``f`` (the paper's downsizing factor) is ``s**2`` in 2D and ``s**3`` in 3D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medlatent.model.config import MedVAEConfig
from medlatent.names import did_you_mean

HF_REPO = "stanfordmimi/MedVAE"


@dataclass(frozen=True)
class ModelInfo:
    """One member of the family.

    Attributes:
        name: registry name (the official model name).
        config: architecture.
        hub_config: path of the official YAML config in the hub repo.
        hub_checkpoint: path of the official checkpoint in the hub repo.
        lora: whether the official checkpoint stores rank-4 LoRA adapters (merged at load).
        modalities: modalities the model was trained on.
        description: one line for ``medlatent models``.
        repo_id: Hugging Face repo holding the weights.
        sha256: expected SHA-256 of the checkpoint file, when known.
        bundled: the weights ship inside the package (``medlatent/weights/<name>/``); no hub involved.
        max_tile: inference default, the largest image-space tile edge the tiling engine picks by itself for this
            member (:attr:`MedVAE.max_tile <medlatent.model.autoencoder.MedVAE>`; ``None``: no limit). A bundled
            member's ``config.json`` holds the same value (the loaders read it from there).
    """

    name: str
    config: MedVAEConfig
    hub_config: str
    hub_checkpoint: str
    lora: bool = False
    modalities: tuple[str, ...] = ()
    description: str = ""
    repo_id: str = HF_REPO
    sha256: str | None = None
    tags: tuple[str, ...] = field(default=())
    bundled: bool = False
    max_tile: int | None = None

    @property
    def f(self) -> int:
        return self.config.f

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name
        return self.config.embed_dim

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """Look up a registry entry; unknown names answer with the closest valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}.{did_you_mean(name, _REGISTRY)} "
                       f"Available: {', '.join(list_models())}") from None


_F4 = (1, 2, 4)  # two downsamplings: ÷4 per axis
_F8 = (1, 2, 4, 4)  # three downsamplings: ÷8 per axis
_2D_MODALITIES = ("xray", "mammography", "ct-slice", "mri-slice")


def _member(
    s: int, c: int, dims: int, *, rgb: bool = False, lora: bool = False, ckpt: str, yaml: str, desc: str
) -> ModelInfo:
    io_ch = 3 if rgb else 1
    cfg = MedVAEConfig(
        spatial_dims=dims,
        in_channels=io_ch,
        out_channels=io_ch,
        ch=128,
        ch_mult=_F4 if s == 4 else _F8,
        num_res_blocks=2,
        z_channels=c,
        embed_dim=c,
    )
    return ModelInfo(
        name=f"medvae_{s}_{c}_{dims}d",
        config=cfg,
        hub_config=yaml,
        hub_checkpoint=ckpt,
        lora=lora,
        modalities=_2D_MODALITIES if dims == 2 else ("ct", "mri"),
        description=desc,
    )


for _info in (
    _member(4, 1, 2, ckpt="model_weights/vae_4x_1c_2D.ckpt", yaml="model_weights/medvae_4x1.yaml",
            desc="2D, f=16 (H/4×W/4), C=1, trained from scratch"),
    _member(4, 3, 2, rgb=True, lora=True, ckpt="model_weights/vae_4x_3c_2D.ckpt",
            yaml="model_weights/medvae_4x3.yaml",
            desc="2D, f=16 (H/4×W/4), C=3, LoRA on the LDM KL-f4 VAE (3-channel image input)"),
    _member(4, 4, 2, ckpt="model_weights/vae_4x_4c_2D.ckpt", yaml="model_weights/medvae_4x4.yaml",
            desc="2D, f=16 (H/4×W/4), C=4"),
    _member(8, 1, 2, ckpt="model_weights/vae_8x_1c_2D.ckpt", yaml="model_weights/medvae_8x1.yaml",
            desc="2D, f=64 (H/8×W/8), C=1, trained from scratch"),
    _member(8, 4, 2, rgb=True, lora=True, ckpt="model_weights/vae_8x_4c_2D.ckpt",
            yaml="model_weights/medvae_8x4.yaml",
            desc="2D, f=64 (H/8×W/8), C=4, LoRA on the LDM KL-f8 VAE (3-channel image input)"),
    _member(4, 1, 3, ckpt="model_weights/vae_4x_1c_3D.ckpt", yaml="model_weights/medvae_4x1.yaml",
            desc="3D, f=64 (÷4 per axis), C=1, inflated from 2D and trained on CT/MRI"),
    _member(8, 1, 3, ckpt="model_weights/vae_8x_1c_3D.ckpt", yaml="model_weights/medvae_8x1.yaml",
            desc="3D, f=512 (÷8 per axis), C=1, inflated from 2D and trained on CT/MRI"),
):
    register_model(_info)


# medlatent's own bundled members, trained on public images from pip packages (see each MODEL_CARD.md).
# The 2D default: f=16, C=1 (one stored value per 4×4 block, as many as bicubic interpolation at f=16), fully
# convolutional (no mid-block attention), so whole images and tiles agree and the cost grows linearly with size.
DEFAULT_MODEL = "medlatent_small_4_1_2d"
_SMALL = dict(in_channels=1, out_channels=1, ch=32, ch_mult=_F4, num_res_blocks=1, stage2_head=False, norm_groups=8)
register_model(ModelInfo(
    name=DEFAULT_MODEL,
    config=MedVAEConfig(spatial_dims=2, z_channels=1, embed_dim=1, mid_attention=False, **_SMALL),
    hub_config="", hub_checkpoint="", modalities=_2D_MODALITIES, bundled=True, repo_id="",
    description="2D, f=16 (H/4×W/4), C=1, 2.6 M parameters; bundled 2D default (public images, see its card)",
))
# The earlier default: f=16 with C=4 (4× the values of bicubic at f=16; it loses to bicubic at equal values).
register_model(ModelInfo(
    name="medlatent_small_4_4_2d",
    config=MedVAEConfig(spatial_dims=2, z_channels=4, embed_dim=4, **_SMALL),
    hub_config="", hub_checkpoint="", modalities=_2D_MODALITIES, bundled=True, repo_id="", max_tile=256,
    description="2D, f=16 (H/4×W/4), C=4, 2.7 M parameters; the earlier bundled default (public images)",
))

# The 3D default: f=64, C=1 (÷4 per axis), the 2D default inflated to 3D with its linear path re-fitted on 3D
# patches; fp16 weights (15 MB).
DEFAULT_3D_MODEL = "medlatent_small_4_1_3d"
register_model(ModelInfo(
    name=DEFAULT_3D_MODEL,
    config=MedVAEConfig(spatial_dims=3, z_channels=1, embed_dim=1, mid_attention=False, **_SMALL),
    hub_config="", hub_checkpoint="", modalities=("mri",), bundled=True, repo_id="",
    description="3D, f=64 (÷4 per axis), C=1, 7.6 M parameters; bundled 3D default (public volumes, see its card)",
))

# The model a run uses when none is given, by the input's dimensionality (2D images, 3D volumes).
DEFAULT_MODELS: dict[int, str | None] = {2: DEFAULT_MODEL, 3: DEFAULT_3D_MODEL}


def default_model(spatial_dims: int) -> str | None:
    """The registry name of the default model for ``spatial_dims``-D inputs, or ``None`` if there is none."""
    return DEFAULT_MODELS.get(spatial_dims)
