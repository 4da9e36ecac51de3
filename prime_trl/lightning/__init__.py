"""The PyTorch Lightning path: `PRIMEModule` runs the same PRIME step as `PRIMETrainer`."""

from prime_trl.lightning.module import PRIMEDataModule, PRIMEModule, PRIMEModuleConfig

__all__ = ["PRIMEDataModule", "PRIMEModule", "PRIMEModuleConfig"]
