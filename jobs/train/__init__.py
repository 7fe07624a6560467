"""The training job: the driver side (:mod:`jobs.train.job`), the per-worker loop (:mod:`jobs.train.loop`),
checkpoints, the LR schedule, step progress and the evaluation run during training."""
