"""What both training loops share: process group and device, precision, schedule, checkpoints, metrics logs, the
YAML reader and the list readers. One implementation of each."""
