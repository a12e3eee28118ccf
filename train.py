#!/usr/bin/env python
"""Train the chapter's ResNet-18 on Fashion-MNIST: ``python train.py --help``."""

import sys

from resnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
