"""The lab: what reproduces the paper with the library (CIFAR-10 data, run files, models, the training loop,
the experiments, the benchmark, the campaign and the optimizer comparison). It uses `proxprop_nb`'s public API."""
