"""PyTorch weights in and out: the chapter's ``state_dict`` <-> our Flax variables.

The chapter's network is ``nn.Sequential(b1, b2, b3, b4, b5, AdaptiveAvgPool2d,
Flatten, Linear)``, so its ``state_dict`` keys are positional::

    0.0.weight, 0.0.bias                      b1's Conv2d            -> b1/conv
    0.1.weight, ... 0.1.num_batches_tracked   b1's BatchNorm2d       -> b1/bn
    1.0.conv1.weight ... 1.1.bn2.running_var  b2, residuals 0 and 1  -> b2/Residual_0 ...
    2.0.conv3.weight, 2.0.conv3.bias          the strided 1x1 shortcut of b3 (b4, b5 alike)
    7.weight, 7.bias                          the Linear             -> dense

and every tensor maps one to one onto a Flax variable (:func:`layer_table`):

    Conv2d    weight (O, I, kh, kw)   <-> params     kernel (kh, kw, I, O)   (OIHW <-> HWIO)
              bias (O,)               <-> params     bias
    Linear    weight (out, in)        <-> params     kernel (in, out)
              bias (out,)             <-> params     bias
    BatchNorm weight, bias            <-> params     scale, bias
              running_mean, _var      <-> batch_stats mean, var
              num_batches_tracked     <-> (no Flax variable: see below)

Only transpositions: every number is copied bit for bit, so both round trips
are exact (tests/test_convert.py checks every key with ``array_equal``).

``num_batches_tracked``. PyTorch counts the train-mode forward passes of each
BatchNorm; the count only matters to ``BatchNorm2d(momentum=None)`` (a
cumulative average), which the chapter does not use, so Flax keeps no such
variable. In this network every BatchNorm runs once per training step, so the
counters are all equal to the number of SGD steps, which is ``TrainState.step``.
:func:`torch_to_flax` therefore returns the variables alone, the counters are
read with :func:`batches_tracked`, and :func:`flax_to_torch` writes them back
from an int (one count for every layer) or from the per-layer dict that
:func:`batches_tracked` returns for a state_dict whose layers disagree. With
that, ``flax_to_torch(torch_to_flax(sd), batches_tracked(sd))`` is ``sd``, key
for key, in the same order, with the same dtypes.

The mapping itself is NumPy arrays in, NumPy arrays out: the Flax side never needs torch
(importing this module imports JAX and Flax, for the model's layer table). Only reading and
writing ``.pt`` files (:func:`load_torch_checkpoint`, :func:`save_torch_checkpoint`)
imports torch, and says how to install it when it is missing.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from resnet_jax.errors import first_line
from resnet_jax.files import atomic_write
from resnet_jax.model import STAGES, is_torch_tensor

# Axis orders. Conv: OIHW (PyTorch) <-> HWIO (Flax, lax.conv's "HWIO"). Dense: (out, in) <-> (in, out).
OIHW_TO_HWIO = (2, 3, 1, 0)
HWIO_TO_OIHW = (3, 2, 0, 1)

TORCH_INSTALL_HINT = (
    "reading or writing a PyTorch .pt file needs torch, which is not installed; "
    "install it with: pip install torch --index-url https://download.pytorch.org/whl/cpu"
)

StateDict = Mapping[str, Any]  # str -> array-like (numpy arrays or CPU torch tensors)
Variables = Mapping[str, Any]  # {'params': ..., 'batch_stats': ...}, nested dicts of arrays


# A .pt file's contents as its zip declares them, at most. The chapter's state_dict is 45 MB in
# float32 (twice that in float64, a little more with many classes); torch.load allocates what the
# members declare, which a few MB of deflated data can make gigabytes.
MAX_PT_BYTES = 500_000_000


class ConversionError(ValueError):
    """A state_dict, variables or .pt file that cannot be converted; the message names the first bad key."""


@dataclass(frozen=True)
class Layer:
    """One PyTorch module of the chapter's net and where its tensors live in Flax."""

    torch_prefix: str  # e.g. "1.0.conv1"
    flax_path: tuple[str, ...]  # e.g. ("b2", "Residual_0", "conv1")
    kind: str  # "conv", "bn" or "dense"
    shape: tuple[int, ...]  # conv: OIHW; dense: (out, in); bn: (channels,)


def layer_table(num_classes: int = 10, input_channels: int = 1) -> list[Layer]:
    """Every parameterised layer of the chapter's net, in ``state_dict`` order.

    PyTorch lists a module's tensors in the order its children were assigned in
    ``__init__``: the chapter's ``Residual`` assigns conv1, conv2, conv3, bn1,
    bn2, so that is the order here too. The Flax names are those that
    :class:`resnet_jax.model.ResNet18` gives (``b1/conv``, ``b2/Residual_0/conv1``,
    ``dense``, ...); tests/test_convert.py checks both against the real modules.
    """
    layers = [
        Layer("0.0", ("b1", "conv"), "conv", (64, input_channels, 7, 7)),
        Layer("0.1", ("b1", "bn"), "bn", (64,)),
    ]
    for s, (cin, cout, first_block) in enumerate(STAGES):
        for r in range(2):  # resnet_block(..., num_residuals=2)
            t, f = f"{s + 1}.{r}", (f"b{s + 2}", f"Residual_{r}")
            c_in = cin if r == 0 else cout
            layers.append(Layer(f"{t}.conv1", f + ("conv1",), "conv", (cout, c_in, 3, 3)))
            layers.append(Layer(f"{t}.conv2", f + ("conv2",), "conv", (cout, cout, 3, 3)))
            if r == 0 and not first_block:
                layers.append(Layer(f"{t}.conv3", f + ("conv3",), "conv", (cout, cin, 1, 1)))
            layers.append(Layer(f"{t}.bn1", f + ("bn1",), "bn", (cout,)))
            layers.append(Layer(f"{t}.bn2", f + ("bn2",), "bn", (cout,)))
    layers.append(Layer("7", ("dense",), "dense", (num_classes, STAGES[-1][1])))
    return layers


# (torch suffix, Flax collection, Flax name) for each kind of layer, in state_dict order.
_SLOTS = {
    "conv": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "dense": (("weight", "params", "kernel"), ("bias", "params", "bias")),
    "bn": (
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
    ),
}
NUM_BATCHES_TRACKED = "num_batches_tracked"


def _torch_shape(layer: Layer, suffix: str) -> tuple[int, ...]:
    return layer.shape if suffix == "weight" and layer.kind != "bn" else (layer.shape[0],)


# Both directions return fresh arrays, never views: np.asarray of a CPU torch tensor shares its
# memory, and an optimizer step or a train-mode forward in PyTorch (in place) would otherwise
# change the "converted" Flax variables behind the user's back.
def _to_flax(layer: Layer, suffix: str, a: np.ndarray) -> np.ndarray:
    if suffix == "weight" and layer.kind == "conv":
        a = a.transpose(OIHW_TO_HWIO)
    elif suffix == "weight" and layer.kind == "dense":
        a = a.T
    return np.array(a, np.float32, order="C", copy=True)


def _to_torch(layer: Layer, suffix: str, a: np.ndarray) -> np.ndarray:
    if suffix == "weight" and layer.kind == "conv":
        a = a.transpose(HWIO_TO_OIHW)
    elif suffix == "weight" and layer.kind == "dense":
        a = a.T
    return np.array(a, order="C", copy=True)


def expected_keys(num_classes: int = 10, input_channels: int = 1) -> dict[str, tuple[int, ...]]:
    """The chapter's ``state_dict`` keys and shapes, in order (``num_batches_tracked`` has shape ())."""
    keys = {}
    for layer in layer_table(num_classes, input_channels):
        for suffix, _, _ in _SLOTS[layer.kind]:
            keys[f"{layer.torch_prefix}.{suffix}"] = _torch_shape(layer, suffix)
        if layer.kind == "bn":
            keys[f"{layer.torch_prefix}.{NUM_BATCHES_TRACKED}"] = ()
    return keys


def infer_sizes(state_dict: StateDict) -> tuple[int, int]:
    """(num_classes, input_channels) as the shapes of ``7.weight`` and ``0.0.weight`` say."""
    for key, axes in (("7.weight", 2), ("0.0.weight", 4)):
        if key not in state_dict:
            raise ConversionError(f"not the chapter's ResNet-18 state_dict: missing key '{key}'")
        if len(np.shape(state_dict[key])) != axes:
            raise ConversionError(
                f"not the chapter's ResNet-18 state_dict: '{key}' has shape {tuple(np.shape(state_dict[key]))}, "
                f"want {axes} axes"
            )
    return int(np.shape(state_dict["7.weight"])[0]), int(np.shape(state_dict["0.0.weight"])[1])


def _as_numpy(value, key: str) -> np.ndarray:
    """``value`` (the state_dict's ``key``) as a NumPy array. A torch tensor (recognised by its
    methods, :func:`resnet_jax.model.is_torch_tensor`) is detached and moved to the CPU, a lazy negation
    (``_neg_view``'s bit) is applied, and a reduced-precision float widens to float32, exactly:
    NumPy has no bfloat16. A tensor with no data (the meta device) or in a layout NumPy cannot
    hold (sparse) is a ConversionError naming the key, not torch's own exception."""
    if not is_torch_tensor(value):
        return np.asarray(value)
    if getattr(value, "is_meta", False):  # torch.device("meta"): shapes only, e.g. a model built for sharding
        raise ConversionError(f"'{key}' is a tensor on the meta device: it holds a shape but no values")
    try:
        value = value.detach().cpu().resolve_neg()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    except (RuntimeError, TypeError) as err:  # a sparse or quantized tensor, for example
        raise ConversionError(f"'{key}' cannot be read as a dense array ({type(err).__name__}: {err})") from err


def _check_state_dict(state_dict: StateDict, num_classes: int, input_channels: int) -> dict[str, np.ndarray]:
    """Every key present, none extra, every shape right, floats where floats belong; as numpy arrays."""
    want = expected_keys(num_classes, input_channels)
    for key in want:
        if key not in state_dict:
            raise ConversionError(f"missing key '{key}' (expected the chapter's ResNet-18 state_dict)")
    for key in state_dict:
        if key not in want:
            raise ConversionError(f"unexpected key '{key}' (not in the chapter's ResNet-18 state_dict)")
    arrays = {}
    for key, shape in want.items():
        a = _as_numpy(state_dict[key], key)
        if a.shape != shape:
            raise ConversionError(f"'{key}' has shape {tuple(a.shape)}, expected {shape}")
        if key.endswith(NUM_BATCHES_TRACKED):
            if not np.issubdtype(a.dtype, np.integer):
                raise ConversionError(f"'{key}' has dtype {a.dtype}, expected an integer")
            if a < 0:  # a count of training steps
                raise ConversionError(f"'{key}' is {int(a)}, expected a count (0 or more)")
            if a > np.iinfo(np.int32).max:  # the train state counts its steps in int32: it wrapped, silently
                raise ConversionError(f"'{key}' is {int(a)}, more than the 2**31 - 1 steps a train state counts")
        elif not np.issubdtype(a.dtype, np.floating):
            raise ConversionError(f"'{key}' has dtype {a.dtype}, expected floating point")
        elif not np.isfinite(a).all():  # else "the loss became nan at step 1: try a smaller --lr"
            raise ConversionError(f"holds non-finite values (NaN or inf) in {key}")
        elif a.dtype.itemsize > 4 and (big := float(np.abs(a).max())) > float(np.finfo(np.float32).max):
            # (float64) our float32 parameters would hold inf: "the loss became nan", again
            raise ConversionError(f"'{key}' has values beyond float32's range (up to {big:.3g})")
        elif key.endswith("running_var") and (a < 0).any():  # NaN from the first normalisation on
            raise ConversionError(f"'{key}' has negative values (down to {float(a.min()):.3g}): a variance is 0 or more")
        arrays[key] = a
    return arrays


def torch_to_flax(state_dict: StateDict, num_classes: int | None = None, input_channels: int | None = None) -> dict:
    """The chapter's ``state_dict`` -> ``{'params', 'batch_stats'}`` for :class:`~resnet_jax.model.ResNet18`.

    ``num_classes`` and ``input_channels`` default to what the shapes say; pass
    them to insist on a model (the CLI passes the dataset's). Values may be
    numpy arrays or CPU torch tensors. The whole dict is checked before anything
    is built: a missing or extra key or a wrong shape raises
    :class:`ConversionError` naming the first bad key, and nothing is returned.
    Floating arrays become float32 (our parameters' dtype; the chapter's are
    float32 already, and then the copy is exact). The arrays are copies, never
    views of the input's memory. ``num_batches_tracked`` is
    checked but not carried: see the module docstring and :func:`batches_tracked`.
    """
    if not isinstance(state_dict, Mapping):  # e.g. the nn.Module itself
        raise ConversionError(f"expects a state_dict (a mapping of names to arrays), got a {type(state_dict).__name__}: "
                              "pass net.state_dict()")
    if state_dict and all(str(k).startswith("module.") for k in state_dict):
        raise ConversionError("the keys start with 'module.' (a DataParallel/DistributedDataParallel wrapper): "
                              "pass net.module.state_dict(), or strip the prefix")
    if num_classes is None or input_channels is None:
        inferred = infer_sizes(state_dict)
        num_classes = inferred[0] if num_classes is None else num_classes
        input_channels = inferred[1] if input_channels is None else input_channels
    arrays = _check_state_dict(state_dict, num_classes, input_channels)

    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for layer in layer_table(num_classes, input_channels):
        for suffix, collection, name in _SLOTS[layer.kind]:
            a = _to_flax(layer, suffix, arrays[f"{layer.torch_prefix}.{suffix}"])
            node = variables[collection]
            for part in layer.flax_path:
                node = node.setdefault(part, {})
            node[name] = a
    return variables


def batches_tracked(state_dict: StateDict) -> int | dict[str, int]:
    """The BatchNorm counters of a state_dict: one int when all layers agree (always, for the chapter's
    training), else ``{torch_prefix: count}``. Feed it back to :func:`flax_to_torch`."""
    counts = {
        key[: -len(NUM_BATCHES_TRACKED) - 1]: int(np.asarray(v))
        for key, v in state_dict.items()
        if key.endswith("." + NUM_BATCHES_TRACKED)
    }
    values = set(counts.values())
    return values.pop() if len(values) == 1 else counts


def _flax_leaf(variables: Variables, collection: str, path: tuple[str, ...], name: str):
    node = variables
    for part in (collection, *path, name):
        if not isinstance(node, Mapping) or part not in node:
            raise ConversionError(f"missing Flax variable '{'/'.join((collection, *path, name))}'")
        node = node[part]
    return node


def _flax_paths(tree, prefix=()) -> list[str]:
    if not isinstance(tree, Mapping):
        return ["/".join(prefix)]
    return [p for k in tree for p in _flax_paths(tree[k], (*prefix, k))]


def flax_to_torch(
    variables: Variables,
    num_batches_tracked: int | Mapping[str, int] = 0,
    num_classes: int | None = None,
    input_channels: int | None = None,
) -> dict[str, np.ndarray]:
    """``{'params', 'batch_stats'}`` -> the chapter's ``state_dict``, as numpy arrays in PyTorch's key order.

    ``num_batches_tracked``: one count for every BatchNorm (a run of ours:
    ``int(state.step)``), or a ``{torch_prefix: count}`` dict as
    :func:`batches_tracked` returns. Counters are int64, as PyTorch's.
    The variables are checked completely first (missing or extra variable, wrong
    shape: :class:`ConversionError` naming it). Load the result with
    ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``,
    or write a file with :func:`save_torch_checkpoint`.
    """
    if not isinstance(variables, Mapping):
        raise ConversionError(
            f"expected the variables {{'params': ..., 'batch_stats': ...}}, got a {type(variables).__name__}"
            " (of a TrainState, pass training.evaluated_variables(state))"
        )
    if "params" not in variables and "b1" in variables:
        raise ConversionError("got the params alone: pass {'params': params, 'batch_stats': batch_stats}")
    if num_classes is None or input_channels is None:
        # A missing variable is named by _flax_leaf; only the shapes' unpacking can fail here.
        dense = np.shape(_flax_leaf(variables, "params", ("dense",), "kernel"))
        stem = np.shape(_flax_leaf(variables, "params", ("b1", "conv"), "kernel"))
        if len(dense) != 2 or len(stem) != 4:
            raise ConversionError(
                f"not ResNet-18 variables: 'params/dense/kernel' has shape {dense} (want 2 axes) and "
                f"'params/b1/conv/kernel' {stem} (want 4)"
            )
        k_classes, c_in = dense[1], stem[2]
        num_classes = k_classes if num_classes is None else num_classes
        input_channels = c_in if input_channels is None else input_channels
    layers = layer_table(num_classes, input_channels)

    # Check everything before building anything.
    known = set()
    for layer in layers:
        for suffix, collection, name in _SLOTS[layer.kind]:
            path = "/".join((collection, *layer.flax_path, name))
            known.add(path)
            a = np.asarray(_flax_leaf(variables, collection, layer.flax_path, name))
            want = _torch_shape(layer, suffix)
            want = tuple(want[i] for i in OIHW_TO_HWIO) if layer.kind == "conv" and suffix == "weight" else want
            want = want[::-1] if layer.kind == "dense" and suffix == "weight" else want
            if a.shape != want:
                raise ConversionError(f"Flax variable '{path}' has shape {a.shape}, expected {want}")
    for path in _flax_paths(variables):
        if path not in known:
            raise ConversionError(f"unexpected Flax variable '{path}' (not a ResNet-18 variable)")
    bn_prefixes = [layer.torch_prefix for layer in layers if layer.kind == "bn"]
    if isinstance(num_batches_tracked, Mapping):
        for prefix in bn_prefixes:
            if prefix not in num_batches_tracked:
                raise ConversionError(f"num_batches_tracked has no count for BatchNorm '{prefix}'")
        counts = {p: _count(num_batches_tracked[p], f"num_batches_tracked['{p}']") for p in bn_prefixes}
    else:
        counts = dict.fromkeys(bn_prefixes, _count(num_batches_tracked, "num_batches_tracked"))

    state_dict = {}
    for layer in layers:
        for suffix, collection, name in _SLOTS[layer.kind]:
            a = np.asarray(_flax_leaf(variables, collection, layer.flax_path, name))
            # bf16 (NumPy's kind "V") or fp16 parameters (param_dtype): exact in float32, which
            # torch.from_numpy takes (it has no bfloat16 from NumPy).
            if a.dtype.kind == "V" or (np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize < 4):
                a = a.astype(np.float32)
            state_dict[f"{layer.torch_prefix}.{suffix}"] = _to_torch(layer, suffix, a)
        if layer.kind == "bn":
            state_dict[f"{layer.torch_prefix}.{NUM_BATCHES_TRACKED}"] = np.array(counts[layer.torch_prefix], np.int64)
    return state_dict


def _count(value, what: str) -> int:
    """A step count (an int, or a NumPy or JAX integer scalar such as ``state.step``) as an int >= 0."""
    a = np.asarray(value)
    if isinstance(value, bool) or a.ndim != 0 or not np.issubdtype(a.dtype, np.integer) or a < 0:
        raise ConversionError(f"{what} is a count of training steps, an integer >= 0; got {value!r}")
    return int(a)


# --- .pt files: the only place torch is imported ---------------------------------------------


def import_torch():
    """``torch``, or a :class:`ConversionError` that says how to install it."""
    try:
        import torch
    except ImportError as err:
        raise ConversionError(TORCH_INSTALL_HINT) from err
    return torch


def load_torch_checkpoint(path, num_classes: int | None = None, input_channels: int | None = None):
    """A ``.pt`` file holding ``net.state_dict()`` -> (Flax variables, :func:`batches_tracked` counts).

    Loaded with ``weights_only=True`` (tensors only, no arbitrary pickled code)
    onto the CPU, then checked and converted by :func:`torch_to_flax`. A
    :class:`ConversionError` starts with ``path``.
    """
    try:
        return _load_torch_checkpoint(Path(path), num_classes, input_channels)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from err


def _load_torch_checkpoint(path: Path, num_classes: int | None, input_channels: int | None):
    torch = import_torch()
    if not path.is_file():
        raise ConversionError("no such file" if not path.exists() else "not a file")
    # A zip is what torch.load takes one for: a file that starts as one (not a legacy .pt of
    # torch < 1.6, whose pickled bytes can look like a zip's end to zipfile). torch's own reader
    # is laxer than zipfile's, so an archive zipfile cannot read is refused, not handed on unchecked.
    with open(path, "rb") as f:
        declared = 0
        if f.read(4) == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(f) as archive:
                    declared = sum(info.file_size for info in archive.infolist())
            except Exception as err:  # BadZipFile, a garbled name's UnicodeDecodeError...
                raise ConversionError(f"is a damaged zip archive ({type(err).__name__}: {first_line(err)}), "
                                      "not a file written by torch.save") from None
    if declared > MAX_PT_BYTES:
        raise ConversionError(f"declares {declared / 1e6:,.0f} MB of contents, more than any state_dict of this network "
                              f"(45 MB in float32; the limit is {MAX_PT_BYTES / 1e6:,.0f} MB), and is not read")
    try:
        with warnings.catch_warnings():  # torch warns before it raises (a TorchScript archive): one message, ours
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (pickle, zip, KeyError, RuntimeError) for a bad file
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's messages carry terminal bold codes
        if "TorchScript" in text:
            raise ConversionError("is a TorchScript archive (torch.jit.save), not a state_dict: "
                                  "save the weights with torch.save(net.state_dict(), path)") from err
        # weights_only met a class ("Unsupported global: GLOBAL __main__.Net") or a function of a
        # blocked module ("unsupported GLOBAL posix.system whose module posix is blocked"): a file
        # that would run code, if only to build an object, is never quoted torch's advice to load it
        # with weights_only=False.
        if found := re.search(r"(?i)unsupported (?:global:\s*)?GLOBAL (\S+)", text):
            raise ConversionError(
                f"holds pickled Python objects ({found.group(1)}; a whole nn.Module?), not only tensors, and is "
                "not loaded: unpickling them could run any code. Save the weights with torch.save(net.state_dict(), path)"
            ) from err
        # The unpickler's own reason, not the advice about weights_only that torch puts first (to
        # load with weights_only=False, which would run whatever the file holds).
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and "weights_only" not in p]
        detail = reason.group(1) if reason else (paragraphs[0].splitlines()[0] if paragraphs else "")
        raise ConversionError(
            f"is not a file written by torch.save (torch.load: {type(err).__name__}: {detail[:200]})"
        ) from err
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(
            f"holds a {type(obj).__name__}, not a state_dict of tensors (save it with torch.save(net.state_dict(), path))"
        )
    state_dict = {k: _as_numpy(v, k) for k, v in obj.items()}
    variables = torch_to_flax(state_dict, num_classes, input_channels)
    return variables, batches_tracked(state_dict)


def save_torch_checkpoint(path, variables: Variables, num_batches_tracked: int | Mapping[str, int] = 0,
                          replace: bool = True) -> None:
    """Write ``variables`` as the chapter's ``state_dict`` with ``torch.save``, atomically.

    The file is written next to ``path`` under a temporary name and renamed
    over it only when complete, so an interrupted export never leaves a
    half-written file where a good one was. ``replace=False``: a file at ``path`` by then is
    kept, and FileExistsError raised (:func:`resnet_jax.files.atomic_write`).
    """
    torch = import_torch()
    state_dict = flax_to_torch(variables, num_batches_tracked)
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    with atomic_write(path, replace=replace) as f:
        torch.save(tensors, f)
