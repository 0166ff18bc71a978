"""Detector models built on Hugging Face CLIP."""

from ds_trainer.models.clip import CLIPModel, load_vision_tower

__all__ = ["CLIPModel", "load_vision_tower", "build_model"]


def build_model(section) -> CLIPModel:  # section: config.ModelSection
    return CLIPModel(
        model_name=section.model_name,
        mode=section.mode,
        freeze_backbone=section.freeze_backbone,
        num_classes=section.num_classes,
    )
