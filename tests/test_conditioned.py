"""Models that take an image beside the latent (nodes/families.py `conditioned_input_problem`): trained
when every caption carries it, refused naming the node that gives it otherwise; blank by design for
HunyuanVideo 1.5's text-to-video; a carried image at any latent size (each caption is prepared at its images' size in ComfyUI,
its latent-shaped inputs held back from the guider: nodes/conditioning.py `hold_latent_inputs`)."""
import torch

from comfyui_lora_trainer.nodes.conditioning import hold_latent_inputs
from comfyui_lora_trainer.nodes.families import conditioned_input_problem

WAN = " (16 + 20 input channels)"


def test_a_plain_model_and_a_carried_image_train():
    assert conditioned_input_problem("SDXL", "SDXL", "", [False, False]) is None
    assert conditioned_input_problem("WAN21", "WAN21_I2V", WAN, [True, True]) is None


def test_captions_without_the_image_name_the_node_that_gives_it():
    problem = conditioned_input_problem("WAN21", "WAN21_T2V", WAN, [False])  # a Wan 2.2 I2V expert
    assert problem.startswith("positive: this WAN21_T2V model takes an image beside the noisy latent (16 + 20")
    assert "none of the captions carries one" in problem and "WanImageToVideo" in problem
    partly = conditioned_input_problem("BaseModel", "SD15", " (4 + 5 input channels)", [True, False, False])
    assert "2 captions lack one" in partly and "InpaintModelConditioning" in partly


def test_blank_concat_by_design_trains_as_sampling_does():
    assert conditioned_input_problem("HunyuanVideo15", "HunyuanVideo15", " (32 + 33 input channels)", [False]) is None


def test_inputs_with_a_latents_shape_are_held_back_from_the_guider_and_the_rest_stay():
    """What ComfyUI would prepare at one latent size (a start frame, its mask, reference latents) is held
    back per entry; the text, pooled output and guidance stay; the input entries are not changed."""
    start, mask, ref = torch.ones((1, 16, 3, 8, 8)), torch.ones((1, 4, 3, 8, 8)), torch.ones((1, 16, 8, 8))
    pooled = torch.zeros((1, 768))
    entries = [[torch.zeros((1, 4, 8)), {"concat_latent_image": start, "concat_mask": mask, "pooled_output": pooled}],
               [torch.zeros((1, 4, 8)), {"reference_latents": [ref], "guidance": 3.5}],
               [torch.zeros((1, 4, 8)), {"reference_latents": []}]]
    given, held = hold_latent_inputs(entries)
    assert held == {0: {"concat_latent_image": start, "concat_mask": mask}, 1: {"reference_latents": [ref]}}
    assert given[0][1] == {"pooled_output": pooled} and given[1][1] == {"guidance": 3.5}
    assert given[2][1] == {"reference_latents": []}  # nothing shaped in it
    assert set(entries[0][1]) == {"concat_latent_image", "concat_mask", "pooled_output"}
