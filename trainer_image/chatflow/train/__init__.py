"""The trainer: the program inside every training pod, and `chatflow train` on a laptop.

Every process runs `python -m chatflow.train` under torchrun (`chatflow train` starts torchrun on
this machine; a PyTorchJob pod runs torchrun itself).

    launch.py            `chatflow train`: check the run, then start torchrun
    loop.py              the training loop that ties the others together
    distributed.py       process group, ranks, collective helpers
    deepspeed_config.py  the DeepSpeed config, generated from the spec's `training` section
    data.py              each rank's share of the global mixture, as torch batches
    lr.py                warmup + cosine learning rate
    checkpoint.py        atomic checkpoints, newest K kept
    metrics.py           Prometheus metrics (rank 0)
    progress.py          progress bar in a terminal, JSON lines in a pod
"""
