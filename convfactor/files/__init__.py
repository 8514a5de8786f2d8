"""What reads and writes files: checkpoints in, factorized models out, every write staged and atomic.

    checkpoint         a checkpoint file -> weights (torch.load(weights_only=True) unless trusted)
    architecture       --arch: the code that builds the model the weights belong to
    exported_program   a torch.export program (.pt2) lifted back into Conv/Linear/BatchNorm modules
    serialize          the factorized-model file: save, and rebuild through convfactor.pipeline
    atomic             staged writes published together (a failed run leaves the old files or none)
"""
