"""bench/dataset.py runs end to end (its quick form): the figures it reports exist and add up."""
from comfyui_lora_trainer.bench import dataset


def test_the_dataset_bench_measures_loading_and_the_first_step():
    results = dataset.main(["--quick"])
    row = results["loading"]["20"]
    assert row["images"] == 20 and row["buckets"] == 5 and row["encoded"] == 20
    assert row["latents_mib"] < row["pixels_mib"] / 10  # bf16 latents at 1/8 size against float32 pixels
    cold, warm = results["first_step"]["cold"], results["first_step"]["warm"]
    assert cold["encoded"] == 20 and warm["encoded"] == 0  # the second run takes every latent from the cache
    assert results["loading_toy_vae"]["20"]["encoded"] == 20
