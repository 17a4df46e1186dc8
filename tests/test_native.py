"""The native dropout kernels: the same masks and values as the torch ops that stand in for
them, built once and cached, and nothing native where they are turned off or cannot be built."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from peftkit.accel import dropout, native

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture
def without_kernels(monkeypatch):
    """dropout.py's torch-op path, as on a machine without a compiler."""
    monkeypatch.setattr(native, "kernels", lambda: None)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory, and kernels() forgetting what it loaded before and after."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "peftkit"))
    native.kernels.cache_clear()
    yield tmp_path / "peftkit"
    native.kernels.cache_clear()


@needs_compiler
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8191, 8192, 8193, 3 * 8192 + 6, 100_003])
@pytest.mark.parametrize("seed", [0, 12345, 2**64 - 1, 0xDEADBEEFCAFEBABE])
def test_kernel_masks_equal_the_torch_hash(n, seed):
    kernels = native.kernels()
    assert kernels is not None
    threshold = round(0.3 * 65536) - 32768
    keep = torch.empty(n, dtype=torch.uint8)
    kernels.lib.peftkit_keep_mask(keep.data_ptr(), n, seed, threshold, kernels.threads())
    expected = torch.ge(dropout._hashed_lanes(seed, n, "cpu"), threshold).to(torch.uint8)
    assert torch.equal(keep, expected)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (64, 33, 40), (2, 12, 17, 17)])
def test_dropping_is_the_same_with_and_without_kernels(dtype, shape, monkeypatch):
    x = torch.randn(shape).to(dtype)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 3e38, -1e-30])  # signed zeros, near-overflow, tiny
    grad = torch.randn(shape).to(dtype)
    results = []
    for use_kernels in (True, False):
        if not use_kernels:
            monkeypatch.setattr(native, "kernels", lambda: None)
        torch.manual_seed(7)
        out, keep, scale = dropout._drop(x, 0.1)
        results.append((out, keep, scale, dropout._apply(keep, grad, scale)))
    (out, keep, scale, back), (ref_out, ref_keep, ref_scale, ref_back) = results
    assert scale == ref_scale and torch.equal(keep, ref_keep)
    assert torch.equal(out, ref_out) and torch.equal(back, ref_back)
    # and both are x * mask, then * scale, in torch's own arithmetic
    assert torch.equal(out, torch.mul(x, keep).mul_(scale))
    assert 0.05 < 1 - keep.float().mean().item() < 0.15


@needs_compiler
def test_threads_do_not_change_the_result():
    kernels = native.kernels()
    x = torch.randn(5 * 8192 + 3)
    outs = []
    for threads in (1, 2, 4):
        out, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)
        kernels.lib.peftkit_dropout_f32(
            out.data_ptr(), x.data_ptr(), keep.data_ptr(), x.numel(), 1, 99, round(0.5 * 65536) - 32768, 2.0, threads
        )
        outs.append((out, keep))
    assert all(torch.equal(o, outs[0][0]) and torch.equal(k, outs[0][1]) for o, k in outs[1:])


def test_torch_path_masks_at_the_rate(without_kernels):
    torch.manual_seed(0)
    keep, scale = dropout.keep_mask(torch.Size([1000, 1000]), 0.2)
    assert abs(1 - keep.float().mean().item() - 0.2) < 0.002
    x = torch.randn(4, 9).to(torch.bfloat16).t()  # not contiguous: torch ops, whatever the kernels
    out, keep, scale = dropout._drop(x, 0.5)
    assert torch.equal(out, torch.mul(x, keep).mul_(scale))


@needs_compiler
def test_built_once_then_loaded_from_the_cache(fresh_cache, monkeypatch):
    assert native.kernels() is not None
    built = list(fresh_cache.glob("native-*.so"))
    assert len(built) == 1

    def no_build(target):
        raise AssertionError("built again")

    monkeypatch.setattr(native, "_build", no_build)
    native.kernels.cache_clear()
    assert native.kernels() is not None


def test_turned_off_or_unbuildable_gives_none(fresh_cache, monkeypatch):
    monkeypatch.setenv("PEFTKIT_NATIVE", "0")
    assert native.kernels() is None
    monkeypatch.delenv("PEFTKIT_NATIVE")
    monkeypatch.setenv("CC", str(fresh_cache / "no-such-compiler"))
    native.kernels.cache_clear()
    assert native.kernels() is None
    assert list(fresh_cache.glob("native-*.failed")) and not list(fresh_cache.glob("native-*.so"))
    # the failure is remembered: no second attempt
    monkeypatch.setattr(native, "_build", lambda target: pytest.fail("tried to build again"))
    native.kernels.cache_clear()
    assert native.kernels() is None
    # and dropout still works, on torch ops
    torch.manual_seed(0)
    out = dropout.fast_dropout(nn.Dropout(0.5).train())(torch.ones(100, 100))
    assert set(out.unique().tolist()) == {0.0, 2.0}
