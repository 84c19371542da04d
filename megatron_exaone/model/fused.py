"""Inductor-fused kernels for the memory-bound pieces of the step (FlexAttention, the loss's
softmax)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)


@functools.cache
def _compiled(fn: Callable, dynamic: bool | None) -> Callable:
    return torch.compile(fn, dynamic=dynamic)


def fused(fn: Fn, example: torch.Tensor, dynamic: bool | None = None) -> Fn:
    """`fn` compiled by torch.compile for CUDA tensors like `example`. On CPU, and inside a region
    that is already being compiled (which inlines `fn` into its own graph), `fn` itself."""
    if example.is_cuda and not torch.compiler.is_compiling():
        return _compiled(fn, dynamic)
    return fn
