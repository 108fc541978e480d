"""chameleon-fusion: Chameleon-style early-fusion multimodal models on the Hugging Face stack."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_chameleon_fusion import ChameleonFusionConfig, ChameleonFusionVQVAEConfig
from .document_html import write_document_html
from .generation import (
    ChameleonFusionGenerationMixin,
    EarlyFusionLogitsProcessor,
    ImageGuidanceLogitsProcessor,
    ModalityConstrainedLogitsProcessor,
    ModalitySamplingLogitsProcessor,
    SamplingSettings,
    generation_config_with,
)
from .image_processing_chameleon_fusion import ChameleonFusionImageProcessor
from .modeling_chameleon_fusion import (
    ChameleonFusionCausalLMOutput,
    ChameleonFusionForConditionalGeneration,
    ChameleonFusionModel,
    ChameleonFusionPreTrainedModel,
)
from .modeling_vqvae import ChameleonFusionVQVAE
from .processing_chameleon_fusion import ChameleonFusionProcessor
from .tokenization_chameleon_fusion import train_bpe_tokenizer
from .vocabulary import Vocabulary

__version__ = "0.1.0"

AutoConfig.register(ChameleonFusionConfig.model_type, ChameleonFusionConfig, exist_ok=True)
AutoConfig.register(ChameleonFusionVQVAEConfig.model_type, ChameleonFusionVQVAEConfig, exist_ok=True)
AutoModel.register(ChameleonFusionConfig, ChameleonFusionModel, exist_ok=True)
AutoModel.register(ChameleonFusionVQVAEConfig, ChameleonFusionVQVAE, exist_ok=True)
AutoProcessor.register(ChameleonFusionConfig, ChameleonFusionProcessor, exist_ok=True)
AutoImageProcessor.register(
    ChameleonFusionConfig, image_processor_classes={"pil": ChameleonFusionImageProcessor}, exist_ok=True
)
for _auto in (AutoModelForCausalLM, AutoModelForMultimodalLM, AutoModelForImageTextToText):
    _auto.register(ChameleonFusionConfig, ChameleonFusionForConditionalGeneration, exist_ok=True)

# save_pretrained copies the code files next to the weights, for trust_remote_code loading
ChameleonFusionConfig.register_for_auto_class()
ChameleonFusionModel.register_for_auto_class("AutoModel")
ChameleonFusionForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
ChameleonFusionVQVAEConfig.register_for_auto_class()
ChameleonFusionVQVAE.register_for_auto_class("AutoModel")
ChameleonFusionProcessor.register_for_auto_class("AutoProcessor")
ChameleonFusionImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "ChameleonFusionConfig",
    "ChameleonFusionVQVAEConfig",
    "ChameleonFusionModel",
    "ChameleonFusionPreTrainedModel",
    "ChameleonFusionForConditionalGeneration",
    "ChameleonFusionCausalLMOutput",
    "ChameleonFusionVQVAE",
    "ChameleonFusionGenerationMixin",
    "EarlyFusionLogitsProcessor",
    "ImageGuidanceLogitsProcessor",
    "ModalityConstrainedLogitsProcessor",
    "ModalitySamplingLogitsProcessor",
    "SamplingSettings",
    "generation_config_with",
    "write_document_html",
    "ChameleonFusionImageProcessor",
    "ChameleonFusionProcessor",
    "train_bpe_tokenizer",
    "Vocabulary",
]
