"""oneDNN-packed weight copies (kernels.cpu_pack) and their use by ops.linear, against float64 math."""

import pytest
import torch
import torch.nn.functional as F

from deepseek_model.kernels import cpu_pack, ops
from deepseek_model.kernels.cpu_pack import PACKED_MIN_ROWS, PackedWeight

pytestmark = pytest.mark.skipif(not cpu_pack.available(), reason="this torch build has no oneDNN")


def _weight(n, k, dtype, seed=0):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1).to(dtype)


@pytest.mark.parametrize("rows", [1, 3, 17, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_float64_math_on_ragged_shapes(rows, dtype):
    w = _weight(67, 131, dtype)  # odd sizes: no dimension a multiple of oneDNN's blocks
    x = torch.randn(rows, 131, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    bias = torch.randn(67, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = PackedWeight.of(w).linear(x, bias)
    ref = x.double() @ w.double().T + bias.double()  # (rows, 67)
    assert y.dtype == dtype and y.shape == (rows, 67)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_packed_linear_keeps_leading_dims():
    w = _weight(40, 72, torch.float32)
    x = torch.randn(2, 5, 72, generator=torch.Generator().manual_seed(3))
    y = PackedWeight.of(w).linear(x)
    assert y.shape == (2, 5, 40)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-6)


def test_ops_linear_reads_the_packed_copy_where_it_serves():
    w = _weight(48, 64, torch.float32)
    packed = PackedWeight.of(w)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # the blocked copy, not the weight, is read: a copy of a different weight with this one's
        # identity shows through
        other = PackedWeight.of(w * 2)
        forged = PackedWeight(other.blocked, packed.weight_ptr, packed.origin, packed.shape, packed.dtype)
        torch.testing.assert_close(ops.linear(x, w, packed=forged), 2 * F.linear(x, w), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ops.linear(x, w, packed=packed), F.linear(x, w), rtol=1e-5, atol=1e-6)


def test_few_float32_rows_stay_on_the_narrow_path():
    w = _weight(800, 256, torch.float32)  # large enough for the narrow path at one row
    packed = PackedWeight.of(w)
    for rows in range(1, PACKED_MIN_ROWS[torch.float32]):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        assert not packed.serves(x, w)
        assert torch.equal(ops.linear(x, w, packed=packed), ops.linear(x, w))
    assert packed.serves(torch.zeros(PACKED_MIN_ROWS[torch.float32], 256), w)
    wb = w.bfloat16()
    assert PackedWeight.of(wb).serves(torch.zeros(1, 256, dtype=torch.bfloat16), wb)  # every bfloat16 row count


def test_a_weight_changed_after_packing_is_read_directly():
    w = torch.nn.Parameter(_weight(32, 48, torch.float32), requires_grad=False)
    packed = PackedWeight.of(w)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        w.mul_(3)  # in place (an optimizer step): the version counter moves
        torch.testing.assert_close(ops.linear(x, w, packed=packed), F.linear(x, w), rtol=1e-5, atol=1e-6)
        w.data = _weight(32, 48, torch.float32, seed=9)  # replaced storage
        assert not packed.serves(x, w)
        torch.testing.assert_close(ops.linear(x, w, packed=packed), F.linear(x, w), rtol=1e-5, atol=1e-6)


def test_a_gradient_is_never_taken_through_the_packed_copy():
    w = torch.nn.Parameter(_weight(24, 40, torch.float32))
    packed = PackedWeight.of(w)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert not packed.serves(x, w)
    ops.linear(x, w, packed=packed).square().sum().backward()
    ref_x = x.detach().double().requires_grad_()
    ref_w = w.detach().double().requires_grad_()
    F.linear(ref_x, ref_w).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-6)
    w.grad = None
    frozen_x = x.detach()  # only the weight wants a gradient: still not served
    assert not packed.serves(frozen_x, w)
    ops.linear(frozen_x, w, packed=packed).sum().backward()
    torch.testing.assert_close(w.grad, frozen_x.sum(0).expand_as(w), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert packed.serves(frozen_x, w) and packed.origin.usable()


def test_other_dtypes_and_empty_inputs_fall_back():
    w = _weight(16, 32, torch.float32)
    packed = PackedWeight.of(w)
    x16 = torch.randn(4, 32, dtype=torch.bfloat16)
    assert not packed.serves(x16, w)
    assert ops.linear(torch.zeros(0, 32), w, packed=packed).shape == (0, 16)
    assert not packed.serves(torch.zeros(4, 31), w)


@pytest.mark.parametrize("bad", [torch.zeros(4, 4, dtype=torch.float64), torch.zeros(8), torch.zeros(0, 4),
                                 torch.zeros(4, 4).to(torch.float8_e4m3fn)])
def test_unpackable_weights_are_refused_by_name(bad):
    assert not cpu_pack.packable(bad)
    with pytest.raises(ValueError, match="cannot pack a .* weight"):
        PackedWeight.of(bad)


def test_a_weight_viewing_parameters_is_stale_once_a_parameter_changes():
    """An expert's gate and up projections are views into one stacked tensor: an optimizer step on
    either parameter moves only that parameter's version counter, so the pack watches them."""
    stacked = _weight(2 * 16, 24, torch.float32)  # (2I, H): gate rows, then up rows
    gate = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    up = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    gate.data, up.data = stacked[:16], stacked[16:]  # the parameters view the stacked storage
    watching = PackedWeight.of(stacked, sources=(gate, up))
    blind = PackedWeight.of(stacked)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        up.mul_(2)
        assert not watching.serves(x, stacked)
        assert blind.serves(x, stacked)  # the stacked tensor's own counter did not move
        torch.testing.assert_close(ops.linear(x, stacked, packed=watching), F.linear(x, stacked), rtol=1e-5, atol=1e-6)
