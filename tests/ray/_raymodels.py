"""Models for the Ray tests: built from Bastion's zoo, so a Ray worker can unpickle them
(a class defined in a test module cannot be imported on a worker)."""

from __future__ import annotations

import numpy as np


def zoo_digits_cnn(x: np.ndarray, y: np.ndarray, *, epochs: int = 3, seed: int = 0):
    import torch

    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    torch.manual_seed(seed)
    net = build_module("cnn", input_shape=(1, 8, 8), n_classes=10)
    model = TorchModel(net, n_classes=10, input_shape=(1, 8, 8), bounds=(0.0, 1.0),
                       name="zoo-cnn")
    train_classifier(model, x, y, epochs=epochs, lr=3e-3, seed=seed)
    return model
