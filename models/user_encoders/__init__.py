"""Self-supervised user models: the Transformer user encoder, its augmentations, and one
file per pretraining objective (``adaptssr``, ``cl4srec``, ``mip``); ``adapter`` plugs a
pretrained encoder into a ranker. The loop is ``models.pretraining``; MLflow logging and
loading is ``models.user_encoder_registry``.
"""

from models.user_encoders.adapter import PretrainedUserEncoder, item_index_map
from models.user_encoders.adaptssr import AdaptSSRConfig, adaptssr_loss, fusion_coefficient
from models.user_encoders.augment import AugmentConfig, augment, crop, mask, reorder
from models.user_encoders.cl4srec import CL4SRecConfig, info_nce_loss
from models.user_encoders.encoder import (
    PaddedSequences,
    TransformerUserEncoder,
    UserEncoderConfig,
    build_user_encoder,
    history_kjt,
)
from models.user_encoders.mip import MIPConfig

__all__ = [
    "AdaptSSRConfig",
    "AugmentConfig",
    "CL4SRecConfig",
    "MIPConfig",
    "PaddedSequences",
    "PretrainedUserEncoder",
    "TransformerUserEncoder",
    "UserEncoderConfig",
    "adaptssr_loss",
    "augment",
    "build_user_encoder",
    "crop",
    "fusion_coefficient",
    "history_kjt",
    "info_nce_loss",
    "item_index_map",
    "mask",
    "reorder",
]
