"""The model families of strong-lensing images: super-resolution networks, their backbones,
layers and discriminators, and the denoiser some of them use."""
