"""The model families of weak-lensing shear: the shear CNN, its blocks and presets."""
