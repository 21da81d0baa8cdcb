"""The CAD harness and the reconstruction evaluation split into small modules: the public entries keep every name,
log lines keep their logger, and the digests shared by both name files and models as before."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import randomise, tiny_config
from medlatent import MedVAE
from medlatent.evaluation import cad, cad_inputs, cad_report, cad_train, recon
from medlatent.evaluation.baselines import NaturalImageAutoencoder
from medlatent.evaluation.digests import file_digest, model_fingerprint, safe_name, settings_digest, weights_sha256
from medlatent.latentfile import tensor_bytes

# the public names of the two modules before the split (what callers, scripts and tests import from them)
CAD_NAMES = """CACHE_VERSION CADConfig CADDataError CADEntry CADResult CADTask CachedInputs InputBuilder KINDS
LATENT_CHANNELS LATENT_KINDS MIN_TEST_IMAGES MIN_TEST_PER_CLASS Method MethodResult PAPER_SIZE RESIZE_MODES
SELECT_RULES SPLITS SeedRun auroc auroc_ci cad_markdown cad_table_rows cad_warnings default_methods encode_2d
file_digest latent_input model_fingerprint paper_batch_size read_cad_csv resize run_cad stitched_latent_input
train_classifier write_cad_table""".split()
RECON_NAMES = """Box CONVENTION EvalInput EvaluationInputError ImageEvaluation METRICS MIN_IMAGES MethodSpec
ReconOptions ReconResult Sampling StoredCount build_methods default_interp draw_samples evaluate_image
evaluate_reconstruction format_f format_seed_stat format_values_stored gather_inputs interpolation_spec load_input
model_labels natural_spec read_rois recon_warnings roi_psnr slicewise_spec summarise weights_sha256""".split()


@pytest.mark.parametrize("module,names", [(cad, CAD_NAMES), (recon, RECON_NAMES)])
def test_public_entries_keep_every_name(module, names):
    assert [n for n in names if not hasattr(module, n)] == []


def test_pieces_log_under_the_public_module_name():
    """``medlatent -v`` prints the logger's name: the CAD pieces still log as ``medlatent.evaluation.cad``."""
    assert {m.logger.name for m in (cad, cad_inputs, cad_train, cad_report)} == {"medlatent.evaluation.cad"}
    assert recon.logger.name == "medlatent.evaluation.recon"


def _tensor_sha256(model: torch.nn.Module, h=None) -> str:
    h = h or hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + b"\0")
        h.update(tensor_bytes(v))
    return h.hexdigest()


def test_weights_and_fingerprint_digests_are_the_tensor_hashes():
    import json

    model = randomise(MedVAE(tiny_config(2)), 0).eval()
    assert weights_sha256(model) == _tensor_sha256(model)  # in-memory weights: no file digest to take
    config = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    assert model_fingerprint(model) == _tensor_sha256(model, config)
    before = model_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_fingerprint(model) != before  # a changed weight never reuses cached latents
    model.weights_info["sha256"] = "ab" * 32
    assert weights_sha256(model) == "ab" * 32  # a file's digest, as loaded


def test_file_digest_settings_digest_and_safe_names(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"one")
    assert file_digest(tmp_path / "a.dcm") == hashlib.sha256(b"one").hexdigest()
    series = tmp_path / "series"
    series.mkdir()
    (series / "b.dcm").write_bytes(b"two")
    assert file_digest(series) == hashlib.sha256(b"b.dcm\0two").hexdigest()
    assert settings_digest({"b": 1, "a": [2]}) == settings_digest({"a": [2], "b": 1})
    assert len(settings_digest({})) == 12
    assert safe_name("scans/ct 01.nii.gz", "image") == "scans_ct_01.nii.gz"
    assert safe_name("///", "model") == "model"


@pytest.mark.parametrize("kind,family", [("kl", "KL-VAE"), ("vq", "VQ-GAN")])
def test_natural_autoencoder_names_its_family(kind, family):
    assert NaturalImageAutoencoder(torch.nn.Identity(), kind).family == family
