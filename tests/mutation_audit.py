"""Do the tests catch a wrong network? A by-hand audit, not part of the suite (pytest does not collect it).

Each mutation below changes one detail the chapter's maths depends on (BatchNorm's epsilon and
momentum, the padding, the initialisation, the masked last batch, the recipe's ingredients...)
in a copy of the package, and runs the tests that should notice, stopping at the first failure.
A mutation that no test fails is a hole in the suite, unless it is listed in EQUIVALENT with the
reason it cannot change any result.

    python tests/mutation_audit.py              # every mutation: 40-90 min on 2 CPU cores
    python tests/mutation_audit.py bn_eps ...   # some of them

It copies the tree to a temporary folder (the checkout is never touched) and prints one line per
mutation: caught (and by which test) or missed, with the seconds it took.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The files whose tests check the maths (CLI, checkpoint and plotting tests add nothing here),
# the quick ones first: a mutation stops at its first failure.
TESTS = [
    "tests/test_transforms.py", "tests/test_model.py", "tests/test_recipes.py", "tests/test_augment.py", "tests/test_convert.py",
    "tests/test_training.py", "tests/test_recipe_training.py", "tests/test_ops.py", "tests/test_data.py",
    "tests/test_sharding.py",
]

# (name, file, the exact text, what replaces it). Each text occurs once in its file.
MUTATIONS = [
    ("bn_eps", "resnet_jax/model.py", "BN_EPSILON = 1e-5", "BN_EPSILON = 1e-3"),
    ("bn_momentum", "resnet_jax/model.py", "BN_MOMENTUM = 0.1 ", "BN_MOMENTUM = 0.2 "),
    ("biased_running_var", "resnet_jax/model.py",
     "new_var = (1.0 - m) * running_var.value + m * unbiased",
     "new_var = (1.0 - m) * running_var.value + m * var"),
    ("stem_pad", "resnet_jax/model.py", "Conv2d(64, 7, strides=2, padding=3,", "Conv2d(64, 7, strides=2, padding=2,"),
    ("pool_zero_pad", "resnet_jax/model.py", "ops.max_pool(x, 3, stride=2, padding=1, impl=pool_impl)",
     "ops.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, stride=2, padding=0, impl=pool_impl)"),
    ("bn_bwd_dvar", "resnet_jax/model.py", "xc * ((2.0 * dvar - k * inv_std * dscale) / n)",
     "xc * ((1.0 * dvar - k * inv_std * dscale) / n)"),
    ("bn_bwd_dmean", "resnet_jax/model.py", "dyf * k + (dmean - k * dbias) / n", "dyf * k + (- k * dbias) / n"),
    ("masked_count_full", "resnet_jax/model.py",
     "return jnp.maximum(jnp.sum(mask, dtype=dtype), 1) * per_example",
     "return mask.shape[0] * per_example + 0 * jnp.sum(mask, dtype=dtype)"),
    ("conv_init_lecun", "resnet_jax/model.py", 'kernel = self.param("kernel", xavier_uniform,',
     'kernel = self.param("kernel", nn.initializers.lecun_normal(),'),
    ("dense_init", "resnet_jax/model.py", "kernel_init=xavier_uniform,", "kernel_init=nn.initializers.lecun_normal(),"),
    ("bias_init_bound", "resnet_jax/model.py", "bound = 1.0 / math.sqrt(fan_in)", "bound = 2.0 / math.sqrt(fan_in)"),
    ("conv_no_bias", "resnet_jax/model.py", "        return y + bias.astype(dtype)", "        return y + 0 * bias.astype(dtype)"),
    ("loss_mean_includes_padding", "resnet_jax/training.py",
     "mean = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)", "mean = jnp.mean(losses)"),
    ("metrics_count_padding", "resnet_jax/training.py",
     '"correct": jnp.sum(correct & mask).astype(jnp.int32),', '"correct": jnp.sum(correct).astype(jnp.int32),'),
    ("plan_repeats_an_example", "resnet_jax/training.py",
     "rows = jnp.pad(perm, (0, num_chunks * chunk * batch_size - n), constant_values=-1)",
     "rows = jnp.pad(perm.at[-1].set(perm[0]), (0, num_chunks * chunk * batch_size - n), constant_values=-1)"),
    ("resize_truncates", "resnet_jax/transforms.py",
     "total = jnp.int32(1 << (_PRECISION_BITS - 1))", "total = jnp.int32(0)"),
    ("resize_no_antialias", "resnet_jax/transforms.py", "support = 1.0 * filterscale", "support = 1.0"),
    ("to_tensor_multiplies", "resnet_jax/transforms.py", "return jnp.asarray(_GREY_LEVELS)[images.astype(jnp.int32)]",
     "return images.astype(jnp.float32) * (1 / 255)"),
    ("ema_no_ramp", "resnet_jax/recipes.py", "return jnp.minimum(decay, (1.0 + step) / (10.0 + step))",
     "return jnp.minimum(decay, 1.0 + 0 * step)"),
    ("weight_decay_on_everything", "resnet_jax/recipes.py",
     'lambda path, _: path[-1].key == "kernel", params)', "lambda path, _: True, params)"),
    ("no_nesterov", "resnet_jax/recipes.py", "momentum=r.momentum or None, nesterov=r.nesterov",
     "momentum=r.momentum or None, nesterov=False"),
    ("label_smoothing_halved", "resnet_jax/recipes.py",
     "targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)",
     "targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing / 2)"),
    ("flip_up_down", "resnet_jax/augment.py", "return jnp.where(flip, images[:, :, ::-1, :], images)",
     "return jnp.where(flip, images[:, ::-1, :, :], images)"),
    ("crop_offsets_short", "resnet_jax/augment.py", "offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)",
     "offsets = jax.random.randint(key, (n, 2), 0, 2 * pad)"),
    ("erase_square", "resnet_jax/augment.py", "jnp.sqrt(frac * h * w * ratio)", "jnp.sqrt(frac * h * w)"),
    # The recipe's ingredients, each dropped where the steps use it.
    ("train_no_smoothing", "resnet_jax/training.py", "losses = recipes.loss(logits, labels, r.label_smoothing)",
     "losses = recipes.loss(logits, labels, 0.0)"),
    ("train_no_erasing", "resnet_jax/training.py", "augment(key, images, r.crop_pad, r.flip, r.erase_prob)",
     "augment(key, images, r.crop_pad, r.flip, 0.0)"),
    ("eval_ema_live_stats", "resnet_jax/training.py",
     'return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}',
     'return {"params": state.ema_params, "batch_stats": state.batch_stats}'),
    ("eval_no_flip_average", "resnet_jax/training.py", "preprocess(images, resize), state.recipe.tta_flip)",
     "preprocess(images, resize), False)"),
]

# Mutations that cannot change a result of this network, so no test can (or need) catch them.
EQUIVALENT = {
    # b1's pool reads a ReLU output (>= 0): a zero border never beats the window's own maximum,
    # and where a window holds only zeros its gradient is multiplied by ReLU's derivative at 0,
    # which is 0 either way. The -inf padding itself is tested on ops.max_pool (tests/test_ops.py).
    "pool_zero_pad",
}


def run(name: str, file: str, old: str, new: str, tree: Path) -> tuple[bool, str, float]:
    path = tree / file
    src = path.read_text()
    if src.count(old) != 1:
        raise SystemExit(f"{name}: the text to mutate occurs {src.count(old)} times in {file}, not once")
    path.write_text(src.replace(old, new))
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            # Its own --basetemp: pytest's default folder is shared with any other suite run by
            # this user (CI's), and each run wipes what it finds there.
            [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
             f"--basetemp={tree.parent / 'pytest'}", *TESTS],
            cwd=tree, capture_output=True, text=True,
            # The copy has no ../shared beside it: the data stays where the checkout's tests find it.
            env={"FASHION_MNIST_DIR": str(REPO.parent / "shared" / "data" / "fashion_mnist"), **os.environ,
                 "PYTHONPATH": str(tree)},
        )
    finally:
        path.write_text(src)
    failed = [line for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if r.returncode not in (0, 1):  # not "tests failed": a collection error or a crash proves nothing
        raise SystemExit(f"{name}: pytest exited {r.returncode}, not with failed tests:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.returncode == 1, (failed[0] if failed else r.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def main(names: list[str]) -> int:
    if {"-h", "--help"} & set(names):
        print(__doc__.split("\n\n", 1)[1].rstrip() + "\n\nThe mutations: " + ", ".join(m[0] for m in MUTATIONS))
        return 0
    unknown = set(names) - {m[0] for m in MUTATIONS}
    if unknown:
        print(f"no such mutation: {', '.join(sorted(unknown))} (the mutations: "
              f"{', '.join(m[0] for m in MUTATIONS)})", file=sys.stderr)
        return 2
    missed = []
    with tempfile.TemporaryDirectory(prefix="resnet_jax_mutants_") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", ".ci-venv", ".ci-floors-venv", "__pycache__", ".gpu_data", "runs"))
        for name, file, old, new in MUTATIONS:
            if names and name not in names:
                continue
            caught, by, seconds = run(name, file, old, new, tree)
            note = " (equivalent: see EQUIVALENT)" if name in EQUIVALENT else ""
            print(f"{name}: {'caught by ' + by if caught else 'MISSED' + note} ({seconds:.0f} s)", flush=True)
            if not caught and name not in EQUIVALENT:
                missed.append(name)
    if missed:
        print(f"missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
