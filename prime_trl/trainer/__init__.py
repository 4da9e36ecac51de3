"""TRL glue: `PRIMEConfig` (a `GRPOConfig`, in `prime_config`) and `PRIMETrainer` (a `GRPOTrainer`, in
`prime_trainer`), vLLM adapter sync and 4-bit base handling. The two classes are imported on first use, so that
importing a helper module of this package does not load TRL's trainer."""

from typing import TYPE_CHECKING

__all__ = ["PRIMEConfig", "PRIMETrainer"]

if TYPE_CHECKING:
    from .prime_config import PRIMEConfig
    from .prime_trainer import PRIMETrainer


def __getattr__(name: str):
    if name == "PRIMEConfig":
        from .prime_config import PRIMEConfig

        return PRIMEConfig
    if name == "PRIMETrainer":
        from .prime_trainer import PRIMETrainer

        return PRIMETrainer
    raise AttributeError(f"module 'prime_trl.trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily imported names too, as if they were imported already (``dir()``, tab completion)."""
    return sorted(set(globals()) | set(__all__))
