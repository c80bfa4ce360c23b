"""Infrastructure every layer may use: the workdir and its lock, checkpoints, processes and
devices, files, console, progress, XLA options, preemption."""
