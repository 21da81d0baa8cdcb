"""Evaluation suite: reproduce the paper's evaluations on your own data (``medlatent evaluate …``).

* :mod:`medlatent.evaluation.recon` — reconstruction quality (PSNR, MS-SSIM, ROI PSNR) of one or more models
  against baselines at the same downsizing factor and at equal values stored (paper §4.3, Tables 5–7, Figure 4);
  it composes the ``recon_*`` modules (inputs, ROIs, methods, one image, statistics, report).
* :mod:`medlatent.evaluation.baselines` — interpolation, a 2D model slice by slice on volumes, natural-image
  autoencoders (diffusers KL-VAE / VQ-GAN).
* :mod:`medlatent.evaluation.storage` — bytes and values of images against their latents (§4.2).
* :mod:`medlatent.evaluation.honest` — per image and modality: the model through a latent file against
  interpolation at the same f and at equal values stored, and JPEG 2000 at the latent's bytes; bytes against
  ``xz -9e`` and lossless JPEG 2000 (:mod:`medlatent.evaluation.codecs`).
* :mod:`medlatent.evaluation.report` — Markdown reports, bar charts with error bars, residual figures.
* :mod:`medlatent.evaluation.cad`, :mod:`~medlatent.evaluation.classifiers`, :mod:`~medlatent.evaluation.finefeature`,
  :mod:`~medlatent.evaluation.efficiency` — CAD on images, latents and interpolated images (§4.1), the
  fine-feature task and the efficiency benchmark; ``cad`` composes the ``cad_*`` modules (manifest, config,
  methods, inputs, encode, train, results, report). :mod:`~medlatent.evaluation.digests` names files and models.
"""
