"""Entry point of ``medlatent train``: load the config, train, export the model for inference."""

from __future__ import annotations

from pathlib import Path

from medlatent.training.config import TrainConfig


def run(cfg: TrainConfig, *, max_steps: int | None = None) -> dict[str, object]:
    """Train ``cfg`` (resuming from its output folder when it holds checkpoints) and export ``final/``.

    Returns a summary: the step reached, the last validation metrics and the exported folder.
    """
    from medlatent.training.trainer import Trainer

    trainer = Trainer(cfg)
    if trainer.is_main:
        out = Path(cfg.train.output_dir)
        (out / "config.yaml").write_text(cfg.to_yaml())
        print(f"training {cfg.model.name or 'custom model'} ({cfg.train.stage}) on {trainer.world} process(es), "
              f"{len(trainer.train_ds)} training images, {sum(p.numel() for p in trainer.params):,} trained "
              f"parameters, lr {trainer.lr:.3g}; writing to {out}")
    metrics = trainer.fit(max_steps)
    final = trainer.export()
    trainer.end()
    return {"step": trainer.progress.step, "metrics": metrics, "exported": str(final)}
