"""The chapter's PyTorch code, transcribed verbatim: the reference that resnet_jax must equal.

Used only by the parity tests (tests/test_convert.py) and the benchmarks; the
package itself never imports torch. ``Residual``, ``resnet_block`` and the
``b1``..``b5`` / ``net`` layout are the chapter's (d2l, "ResNet", the PyTorch version), with the
input channels and class count as parameters. ``init_weights`` is d2l's
``train_ch6`` initialisation ("the rest of the training unchanged"): Xavier-
uniform for every Conv2d and Linear weight, biases left at PyTorch's default.

Import it from a test or benchmark with ``tests/`` on ``sys.path``
(pytest's rootdir-relative import does this for tests/).
"""

import torch
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):
    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def make_net(input_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """The chapter's ``net`` (state_dict keys ``0.0.weight``, ``1.0.conv1.weight``, ..., ``7.weight``)."""
    b1 = nn.Sequential(
        nn.Conv2d(input_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(64, 128, 2))
    b4 = nn.Sequential(*resnet_block(128, 256, 2))
    b5 = nn.Sequential(*resnet_block(256, 512, 2))
    return nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes))


def init_weights(m):
    """d2l ``train_ch6``: ``net.apply(init_weights)``."""
    if type(m) == nn.Linear or type(m) == nn.Conv2d:  # noqa: E721 - d2l's own test
        nn.init.xavier_uniform_(m.weight)


def make_initialised_net(input_channels: int = 1, num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = make_net(input_channels, num_classes)
    net.apply(init_weights)
    return net
