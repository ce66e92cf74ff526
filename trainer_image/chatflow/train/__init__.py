"""The trainer: the program inside every training pod, and `chatflow train` on a laptop.

Every process runs `python -m chatflow.train` under torchrun (`chatflow train` starts torchrun on
this machine; a PyTorchJob pod runs torchrun itself).

    launch.py            `chatflow train`: check the run, then start torchrun
    loop.py              the training loop: setup, then `train_step` and `report` per step
    step.py              one optimizer step (and the held-out evaluation) on the engine
    data.py              each rank's share of the global mixture; the owner of the sampler position
    model.py             the model loaded (vocabulary extended) into a DeepSpeed engine; saved
    checkpoint.py        the TrainerState; atomic checkpoints, newest K kept
    reporter.py          rank 0's reports of each event: metrics, progress, history
    metrics.py           Prometheus metrics (rank 0)
    progress.py          progress bar in a terminal, JSON lines in a pod
    distributed.py       process group, ranks, collective helpers
    deepspeed_config.py  the DeepSpeed config, generated from the spec's `training` section
    precision.py         `precision: auto` resolved to bf16 or fp32 for the job's devices
    lr.py                warmup + cosine learning rate
    torchrun.py          torchrun with a restartable exit status for preemption
"""
