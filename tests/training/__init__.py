"""Training-stack scenarios run in subprocesses (peft blocked, or under torchrun) by tests/test_training_*.py."""
