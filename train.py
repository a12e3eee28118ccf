#!/usr/bin/env python
"""Train the chapter's ResNet-18 on Fashion-MNIST: ``python train.py --help``."""

import sys

if __name__ == "__main__":
    # Host memory in 2 MiB pages (Linux/glibc; RESNET_JAX_HUGE_PAGES=0 opts out):
    # restarts this command once, before JAX is imported. resnet_jax/hugepages.py says why.
    from resnet_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

    import os

    from resnet_jax import interrupts

    interrupts.install()  # before JAX is imported: no Ctrl-C goes unheard (resnet_jax/interrupts.py)
    try:
        from resnet_jax.cli import EXIT_INTERRUPTED, main
    except KeyboardInterrupt:  # Ctrl-C while JAX and TensorFlow were still importing
        print("train.py: interrupted", file=sys.stderr)
        sys.exit(130)

    code = main()
    if code == EXIT_INTERRUPTED:
        # Ctrl-C was handled: the message is out, the checkpoint saved and its files closed.
        # JAX's exit handlers would now race its own threads (a compile cut short; a second
        # Ctrl-C): tracebacks, and now and then a crash (exit 139). Leave without them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
