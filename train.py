#!/usr/bin/env python
"""Train the chapter's ResNet-18 on Fashion-MNIST: ``python train.py --help``."""

import sys

if __name__ == "__main__":
    # Host memory in 2 MiB pages (Linux/glibc; RESNET_JAX_HUGE_PAGES=0 opts out):
    # restarts this command once, before JAX is imported. resnet_jax/hugepages.py says why.
    from resnet_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

    import signal

    from resnet_jax.cli import EXIT_INTERRUPTED, main

    code = main()
    if code == EXIT_INTERRUPTED:
        # Ctrl-C was handled (the message is out, the checkpoint safe). Another one now
        # would only break JAX's exit handlers: a traceback, or once in a while a crash.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
