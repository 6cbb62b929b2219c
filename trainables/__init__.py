"""Ray Tune function trainables for the built-in tasks (thin wrappers of `TargetTrainer`)."""

from trainables.targets import (
    TASK_TRAINABLES,
    cifar10_wrn,
    digits_mlp,
    fashion_mnist_lenet,
    mnist_lenet,
    mnist_mlp,
    target_trainable,
    trainable_for,
)

__all__ = ["TASK_TRAINABLES", "cifar10_wrn", "digits_mlp", "fashion_mnist_lenet", "mnist_lenet",
           "mnist_mlp", "target_trainable", "trainable_for"]
