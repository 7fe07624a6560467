"""Running on a Ray cluster from outside: ``dhrcnn submit`` (Ray Jobs API), what a job carries, the dashboard's
address and token."""
