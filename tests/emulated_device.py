"""An emulated accelerator for CPU-only CI: tensors that say they live on ``cuda:0`` but compute on the CPU.

What it catches is what a GPU run would: an op that mixes a device tensor with a CPU tensor (other than
a 0-dim scalar, which CUDA also accepts), i.e. a tensor created without ``device=`` inside code that
runs on the device. Why not PyTorch's own tools: ``FakeTensorMode`` and the ``meta`` device have no
data, so every data-dependent step (``.item()``, ``nonzero``, a convergence test, a fallback chosen by
a value) raises, and every compressor here has some; this wrapper keeps real CPU data.

How: ``Remote`` is a wrapper subclass whose ``device`` is ``cuda:0`` and which holds a CPU tensor;
``emulated_device()`` installs a torch-function mode that (a) runs every torch function with a Remote
argument on the unwrapped CPU tensors after checking that no CPU tensor of dim > 0 is mixed in, and
wraps the results again, and (b) turns ``device="cuda"`` in factories and ``.to("cuda")``/``.cuda()``
into a Remote result. Autograd on the wrapper is not supported (no CUDA guard in a CPU build): run under
``torch.no_grad()``, which ``emulated_device()`` enters.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("cuda", 0)

# Functions allowed to see tensors of both devices, as on a real GPU: copies between devices, and
# indexing a device tensor with CPU index tensors.
CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda,
                torch.Tensor.__getitem__, torch.Tensor.__setitem__}




def _histc(values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """CUDA's histc takes integer tensors (transformers' MoE routing counts experts so on a GPU); the
    CPU kernel does not: count in float and return the input's dtype, as CUDA does."""
    return torch.histc(values.to(torch.float64), *args, **kwargs).to(values.dtype)


# Ops whose CUDA kernel accepts inputs the CPU kernel refuses, emulated on the CPU.
GPU_ONLY = {torch.histc: _histc}


class DeviceMismatch(RuntimeError):
    pass


class Remote(torch.Tensor):
    local: torch.Tensor

    @staticmethod
    def __new__(cls, local: torch.Tensor) -> "Remote":
        if isinstance(local, Remote):
            return local
        wrapper = torch.Tensor._make_wrapper_subclass(cls, local.shape, strides=local.stride(), dtype=local.dtype,
                                                      device=DEVICE, storage_offset=local.storage_offset())
        wrapper.local = local
        return wrapper

    def __deepcopy__(self, memo: dict) -> "Remote":
        copied = Remote(self.local.clone())
        if getattr(self, "_is_param", False):      # a Parameter stays one (nn.Parameter's own rule)
            copied._is_param = True
        memo[id(self)] = copied
        return copied

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"Remote({self.local!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """Reached only by ops called outside the mode (C++ internals on a wrapper): run them locally."""
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {}))
        return tree_map(_wrap, out)


def _unwrap(value: Any) -> Any:
    return value.local if isinstance(value, Remote) else value


def _wrap(value: Any) -> Any:
    return Remote(value.detach()) if isinstance(value, torch.Tensor) and not isinstance(value, Remote) else value


def _targets_device(value: Any) -> bool:
    if isinstance(value, (str, torch.device)):
        return torch.device(value).type == DEVICE.type
    return isinstance(value, Remote)


def _is_device(value: str | torch.device) -> bool:
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


def _with_local_device(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool | None]:
    """Replace a requested device (keyword, or a positional device of ``Tensor.to``) by the CPU."""
    wanted: bool | None = None
    if kwargs.get("device") is not None:
        wanted = _targets_device(kwargs["device"])
        kwargs = {**kwargs, "device": "cpu"}
    new_args = list(args)
    for i, arg in enumerate(args[1:], start=1):
        if isinstance(arg, (str, torch.device)) and _is_device(arg):
            wanted, new_args[i] = _targets_device(arg), "cpu"
    return tuple(new_args), kwargs, wanted


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":                          # properties: the wrapper answers for itself
            owner = args[0]
            if isinstance(owner, Remote):
                prop = getattr(func, "__self__", None)
                if prop is torch.Tensor.device:
                    return DEVICE
                if prop is torch.Tensor.is_cuda:
                    return True
                if prop is torch.Tensor.is_cpu:
                    return False
                return tree_map(_wrap, func(owner.local))
            return func(*args, **kwargs)
        if func is torch._has_compatible_shallow_copy_type:     # nn.Module.to: a new Parameter, not .data =
            return type(args[0]) is type(args[1])
        leaves, _ = tree_flatten((args, kwargs))
        remote = any(isinstance(t, Remote) for t in leaves)
        if func is torch.Tensor.cuda:
            func, args = torch.Tensor.to, (args[0], DEVICE)
        args, kwargs, wanted = _with_local_device(args, kwargs)
        if func is torch.Tensor.cpu:
            wanted = False
        if remote and func not in CROSS_DEVICE:
            local = [t for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, Remote) and t.dim() > 0]
            if local:
                raise DeviceMismatch(f"{getattr(func, '__qualname__', func)}: expected all tensors on one device, "
                                     f"found {DEVICE} and cpu (a CPU tensor of shape {tuple(local[0].shape)})")
        if func in GPU_ONLY:
            func = GPU_ONLY[func]
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if isinstance(args[0] if args else None, Remote) and (name.endswith("_") and not name.endswith("__")
                                                              or name == "__setitem__"):
            return args[0]                             # in place: the same wrapper, as on a real device
        if out is None:
            return None
        to_device = wanted if wanted is not None else remote
        if not to_device:
            return out
        if func is torch.Tensor.to and not isinstance(args[0], Remote):
            out = out.detach().clone()               # a copy onto the device, as on a real one
        return tree_map(_wrap, out)


@contextlib.contextmanager
def emulated_device() -> Iterator[torch.device]:
    """Within this block ``cuda:0`` exists (on the CPU): ``.to(device)`` modules and tensors onto it."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with _Mode(), torch.no_grad():
            yield DEVICE
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def on_device(value: Any) -> Any:
    """A tensor, or every tensor in a nested structure / statistic object, moved onto the device."""
    return tree_map(lambda t: Remote(t.detach()) if isinstance(t, torch.Tensor) else t, value)


def all_on_device(module: nn.Module) -> bool:
    return all(isinstance(t, Remote) for t in list(module.parameters()) + list(module.buffers()))
