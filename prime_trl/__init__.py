"""prime-trl: PRIME (Process Reinforcement through Implicit Rewards) on the Hugging Face stack.

The policy is a LoRA adapter, the implicit process reward model (PRM) a second LoRA adapter on the same frozen
base, and the reference that base with adapters disabled.

`PRIMEConfig` and `PRIMETrainer` are imported on first use, so that light modules (`prime_trl.algo.core`,
`prime_trl.rewards`, `prime_trl.data`) do not pull in TRL.
"""

import logging
from typing import TYPE_CHECKING

# bitsandbytes (imported by transformers / peft) warns on every CPU start that an optional Hub kernel package is
# missing; it is harmless (its pure-torch path is used) and would otherwise open every prime-trl command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = ["PRIMEConfig", "PRIMETrainer", "__version__"]

if TYPE_CHECKING:
    from .trainer.prime_config import PRIMEConfig
    from .trainer.prime_trainer import PRIMETrainer


def __getattr__(name: str):
    if name in ("PRIMEConfig", "PRIMETrainer"):
        from . import trainer  # light: it imports the two classes on first use too

        return getattr(trainer, name)
    raise AttributeError(f"module 'prime_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily imported names too, as if they were imported already (``dir()``, tab completion)."""
    return sorted(set(globals()) | set(__all__))
