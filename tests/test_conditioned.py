"""Models that take an image beside the latent (nodes/families.py `conditioned_input_problem`): trained
when every caption carries it, refused naming the node that gives it otherwise; blank by design for
HunyuanVideo 1.5's text-to-video; one latent size per run."""
from comfyui_lora_trainer.nodes.families import conditioned_input_problem

WAN = " (16 + 20 input channels)"


def test_a_plain_model_and_a_carried_image_train():
    assert conditioned_input_problem("SDXL", "SDXL", "", [False, False], 3) is None
    assert conditioned_input_problem("WAN21", "WAN21_I2V", WAN, [True, True], 1) is None


def test_captions_without_the_image_name_the_node_that_gives_it():
    problem = conditioned_input_problem("WAN21", "WAN21_T2V", WAN, [False], 1)  # a Wan 2.2 I2V expert
    assert problem.startswith("positive: this WAN21_T2V model takes an image beside the noisy latent (16 + 20")
    assert "none of the captions carries one" in problem and "WanImageToVideo" in problem
    partly = conditioned_input_problem("BaseModel", "SD15", " (4 + 5 input channels)", [True, False, False], 1)
    assert "2 captions lack one" in partly and "InpaintModelConditioning" in partly


def test_blank_concat_by_design_trains_as_sampling_does():
    assert conditioned_input_problem("HunyuanVideo15", "HunyuanVideo15", " (32 + 33 input channels)", [False], 1) is None


def test_one_latent_size_per_run_with_an_image_beside():
    problem = conditioned_input_problem("WAN21", "WAN21_I2V", WAN, [True], 2)
    assert problem.startswith("latents: this WAN21_I2V model") and "2 sizes; train one size at a time" in problem
