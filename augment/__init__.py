"""Online stage: crop, flip, PCA lighting and normalisation of shard images, on GPU or CPU."""
