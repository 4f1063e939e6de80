"""Around the core: export to a Hugging Face directory, the lm-evaluation-harness model, denoising
trajectories, backbone pretraining."""
