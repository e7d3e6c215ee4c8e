"""Models that take an image beside the latent (nodes/families.py `conditioned_input_problem`): trained
when every caption carries it, refused naming the node that gives it otherwise; blank by design for
HunyuanVideo 1.5's text-to-video; a carried image at any latent size (each caption is prepared at its images' size in ComfyUI)."""
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
