"""Ray Tune sweeps over the training job: the ``tune:`` config, the sweep, its results table."""
