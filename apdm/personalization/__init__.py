"""The shared personalization simulator (DreamBooth / LoRA / Textual Inversion); see :mod:`.simulator`."""

from apdm.personalization.simulator import (  # noqa: F401
    METHODS,
    PersonalizationState,
    class_images_for,
    finish,
    load_personalized,
    loss,
    prompt_for,
    save,
    setup,
    step,
    train,
)
