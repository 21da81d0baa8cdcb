"""Entry point of ``medlatent train`` and ``medlatent finetune``: load the config, train, export the model."""

from __future__ import annotations

from pathlib import Path

from medlatent.training.config import TrainConfig


def run(cfg: TrainConfig, *, max_steps: int | None = None) -> dict[str, object]:
    """Train ``cfg`` (resuming from its output folder when it holds checkpoints) and export ``final/``.

    Returns a summary: the step reached, the last validation metrics, the exported folder and the model's name.

    Raises:
        medlatent.training.trainer.TrainingInterrupted: SIGINT/SIGTERM stopped the run after saving a checkpoint.
    """
    from medlatent.training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        if trainer.is_main:
            out = Path(cfg.train.output_dir)
            (out / "config.yaml").write_text(cfg.to_yaml())
            keep = cfg.train.keep_checkpoints
            print(f"training {cfg.export_name()} from {cfg.model.init} ({cfg.model.name or 'custom architecture'}, "
                  f"{cfg.train.stage}) on {trainer.world} process(es), {len(trainer.train_ds)} training images, "
                  f"{len(trainer.val_ds) if trainer.val_ds is not None else 'no'} validation images, "
                  f"{sum(p.numel() for p in trainer.params):,} trained parameters, lr {trainer.lr:.3g}; writing to "
                  f"{out} (keeps the last {keep or 'all'} checkpoints: train.keep_checkpoints=N to change)",
                  flush=True)
        metrics = trainer.fit(max_steps)
        final = trainer.export()
    finally:
        trainer.end()
    return {"step": trainer.progress.step, "metrics": metrics, "exported": str(final), "name": cfg.export_name()}
