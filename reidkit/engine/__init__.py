"""Engine: checkpoints, training, extraction and evaluation."""
