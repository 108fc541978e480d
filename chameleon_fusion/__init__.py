"""chameleon-fusion: Chameleon-style early-fusion multimodal models on the Hugging Face stack."""

from transformers import AutoConfig

from .configuration_chameleon_fusion import ChameleonFusionConfig, ChameleonFusionVQVAEConfig
from .vocabulary import Vocabulary

__version__ = "0.1.0"

AutoConfig.register(ChameleonFusionConfig.model_type, ChameleonFusionConfig, exist_ok=True)
AutoConfig.register(ChameleonFusionVQVAEConfig.model_type, ChameleonFusionVQVAEConfig, exist_ok=True)

__all__ = ["ChameleonFusionConfig", "ChameleonFusionVQVAEConfig", "Vocabulary"]
