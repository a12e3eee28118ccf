"""resnet_jax: the "Dive into Deep Learning" ResNet-18 in JAX/Flax, exactly, and fast.

    from resnet_jax import ResNet18, Residual, resnet_block
"""

__all__ = ["BatchNorm", "Conv2d", "Residual", "ResNet18", "Stage", "count_params", "init_variables", "resnet_block"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model (and with it JAX and Flax) loads on first use, so that train.py can
    # set up the process (resnet_jax.hugepages) before JAX is imported.
    if name in __all__:
        from resnet_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names above, for tab completion and IDEs.
    return sorted({*globals(), *__all__})
