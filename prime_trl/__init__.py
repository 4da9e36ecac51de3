"""prime-trl: PRIME (Process Reinforcement through Implicit Rewards) on the Hugging Face stack.

The policy is a LoRA adapter, the implicit process reward model (PRM) a second LoRA adapter on the same frozen
base, and the reference that base with adapters disabled.
"""

from .config import PRIMEConfig
from .trainer import PRIMETrainer

__version__ = "0.1.0"

__all__ = ["PRIMEConfig", "PRIMETrainer", "__version__"]
