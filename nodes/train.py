"""Train LoRA: the node's schema and a thin execute (docs/nodes.md#train-lora-loratrainer_trainlora)."""
from __future__ import annotations

from ..training.config import MAIN
from .common import CATEGORY, NONE_LORA, lora_choices
from .conditioning import source_class
from .options import OPTIONS_TYPE
from .preview import PREVIEW_TYPE
from .validation import VALIDATION_TYPE
from .widgets import widgets


class TrainLoRA:
    DESCRIPTION = "Teaches a model a style or subject from example images, entirely inside ComfyUI."
    CATEGORY = CATEGORY
    FUNCTION = "execute"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "IMAGE")
    RETURN_NAMES = ("model_with_lora", "lora", "loss", "steps", "previews")
    OUTPUT_TOOLTIPS = (
        "The base model with the trained LoRA applied, usable by any sampler node.",
        "The LoRA weights alone, to save or apply to another model.",
        "The loss history, for monitoring ({'loss': [...]}, plus 'validation_loss' and 'validation_step' with a "
        "validation set).",
        "Total steps trained, including the earlier steps of a continued LoRA.",
        "The previews over the steps as one grid image (a small blank image when no preview is connected).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to train."}),
                "latents": ("LATENT", {"tooltip": "The training images, VAE-encoded: one batch, or several LATENTs of different sizes."}),
                "positive": ("CONDITIONING", {"tooltip": "The caption(s): one for all images, or one per image. A ConditioningCombine is one combined caption (its prompts applied together)."}),
            },
            "optional": {**_main_inputs(), "options": (OPTIONS_TYPE, {
                "tooltip": "Advanced settings from the LoRA Options nodes (noise and timesteps, loss, optimizer and "
                           "memory, dropout, checkpoints and resume, EMA), a LoRA Preservation node (preservation "
                           "losses, a regularisation set), a LoRA Text Encoder node (the CLIP trained too) and a "
                           "LoRA Training Adapter node; unset, every one keeps its default."}),
                "preview": (PREVIEW_TYPE, {"tooltip": "Sample previews while training, from a LoRA Training "
                                                      "Preview node."}),
                "validation": (VALIDATION_TYPE, {"tooltip": "Held-out images whose loss is measured while training, "
                                                            "from a LoRA Validation Set node."}),
                "high_noise_model": ("MODEL", {"tooltip": "Wan 2.2 A14B: the high-noise expert, trained in the same "
                                               "run as model (then the low-noise expert), each step the expert "
                                               "whose noise range (the options' expert_boundary) holds its noise "
                                               "level; one LoRA each, and one resident at a time. The lora output "
                                               "carries both: Save LoRA writes <prefix>_high_noise… and "
                                               "<prefix>_low_noise…; model_with_lora is model's."})},
            # the workflow: which node feeds `positive` decides how its list reads (nodes/conditioning.py)
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def execute(self, model, latents, positive, options=None, preview=None, validation=None, prompt=None,
                unique_id=None, high_noise_model=None, **inputs) -> tuple:
        from .comfy_train import train_lora  # ComfyUI glue, imported only when the node runs

        source = source_class(prompt[0] if prompt else None, unique_id[0] if unique_id else None, "positive")
        return train_lora(model[0], latents, positive, {k: v[0] for k, v in inputs.items()},
                          options[0] if options else None, preview[0] if preview else None,
                          validation[0] if validation else None, source,
                          high_noise_model[0] if high_noise_model else None)


def _main_inputs() -> dict[str, tuple]:
    """TrainConfig's Train LoRA fields, with existing_lora after lora_dtype (the order docs/nodes.md lists)."""
    fields = widgets(MAIN)
    names = list(fields)
    at = names.index("lora_dtype") + 1
    existing = ("existing_lora", (lora_choices(), {"default": NONE_LORA, "tooltip": "Continue training this LoRA "
                                  "instead of starting fresh (any format; steps read from its name)."}))
    return dict([*[(n, fields[n]) for n in names[:at]], existing, *[(n, fields[n]) for n in names[at:]]])
