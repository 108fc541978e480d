"""chameleon-fusion: Chameleon-style early-fusion multimodal models on the Hugging Face stack."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
)

from .configuration_chameleon_fusion import ChameleonFusionConfig, ChameleonFusionVQVAEConfig
from .modeling_chameleon_fusion import (
    ChameleonFusionCausalLMOutput,
    ChameleonFusionForConditionalGeneration,
    ChameleonFusionModel,
    ChameleonFusionPreTrainedModel,
)
from .modeling_vqvae import ChameleonFusionVQVAE
from .vocabulary import Vocabulary

__version__ = "0.1.0"

AutoConfig.register(ChameleonFusionConfig.model_type, ChameleonFusionConfig, exist_ok=True)
AutoConfig.register(ChameleonFusionVQVAEConfig.model_type, ChameleonFusionVQVAEConfig, exist_ok=True)
AutoModel.register(ChameleonFusionConfig, ChameleonFusionModel, exist_ok=True)
AutoModel.register(ChameleonFusionVQVAEConfig, ChameleonFusionVQVAE, exist_ok=True)
for _auto in (AutoModelForCausalLM, AutoModelForMultimodalLM, AutoModelForImageTextToText):
    _auto.register(ChameleonFusionConfig, ChameleonFusionForConditionalGeneration, exist_ok=True)

# save_pretrained copies the code files next to the weights, for trust_remote_code loading
ChameleonFusionConfig.register_for_auto_class()
ChameleonFusionModel.register_for_auto_class("AutoModel")
ChameleonFusionForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
ChameleonFusionVQVAEConfig.register_for_auto_class()
ChameleonFusionVQVAE.register_for_auto_class("AutoModel")

__all__ = [
    "ChameleonFusionConfig",
    "ChameleonFusionVQVAEConfig",
    "ChameleonFusionModel",
    "ChameleonFusionPreTrainedModel",
    "ChameleonFusionForConditionalGeneration",
    "ChameleonFusionCausalLMOutput",
    "ChameleonFusionVQVAE",
    "Vocabulary",
]
