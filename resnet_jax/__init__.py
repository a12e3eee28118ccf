"""resnet_jax: the "Dive into Deep Learning" ResNet-18 in JAX/Flax, exactly, and fast.

    from resnet_jax import ResNet18, Residual, resnet_block
"""

from resnet_jax.model import BatchNorm, Conv2d, Residual, ResNet18, count_params, init_variables, resnet_block

__all__ = ["BatchNorm", "Conv2d", "Residual", "ResNet18", "count_params", "init_variables", "resnet_block"]
__version__ = "0.1.0"
