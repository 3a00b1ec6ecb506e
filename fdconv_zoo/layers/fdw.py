"""Fourier Disjoint Weight (FDW), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

The learnable parameter is the 2-D real FFT of the dense kernel seen as a (Cout*k, Cg*k) matrix. Its bins are
split into ``n`` groups by radial frequency; a per-sample attention value per group scales each group, and the
inverse FFT gives the per-sample kernel. With every attention value equal to 1 the kernel is the dense one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from . import native
from .workspace import scratch

# modulate(part, out, first_row): out = part * modulation, for the rows of the weight matrix that start at first_row
Modulation = Callable[[torch.Tensor, torch.Tensor, int], None]


def fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32 at least (bf16/fp16 spectra lose too much), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(..., Cout, Cg, k, k) -> (..., Cout*k, Cg*k): row o*k+u, column i*k+v (the paper's weight-matrix view)."""
    *lead, cout, cg, k, _ = weight.shape
    return weight.transpose(-3, -2).reshape(*lead, cout * k, cg * k)


def matrix_to_weight(matrix: torch.Tensor, out_channels: int, kernel_size: int) -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix`; returns a (non-contiguous) view (..., Cout, Cg, k, k)."""
    *lead, rows, cols = matrix.shape
    k = kernel_size
    return matrix.view(*lead, out_channels, k, cols // k, k).transpose(-3, -2)


def dense_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Dense (Cout, Cg, k, k) weight -> its half spectrum, column-major as FDW stores it: (C, R, 2) real/imag
    pairs with entry [c, r] = rfft2(M)[r, c]. Computed in float64 so that the layer reproduces the dense one
    exactly."""
    return torch.view_as_real(torch.fft.rfft2(weight_to_matrix(weight.double())).t().contiguous())


def radial_grouping(rows: int, cols: int, num_groups: int, device: torch.device | None = None) -> torch.Tensor:
    """Group index of every bin of a (rows, cols//2+1) half spectrum, lowest radial frequencies in group 0.

    Bins are ordered by radius with a stable sort (ties by flat index r*C + c), so the grouping is the same on
    every build; the ordered list is cut into ``num_groups`` contiguous runs whose sizes differ by at most one.
    """
    fr = torch.fft.fftfreq(rows, dtype=torch.float64)
    fc = torch.fft.rfftfreq(cols, dtype=torch.float64)
    radius = (fr[:, None] ** 2 + fc[None, :] ** 2).flatten()
    num_bins = radius.numel()
    if not 1 <= num_groups <= num_bins:
        raise ValueError(
            f"number of frequency groups n={num_groups} must be between 1 and the {num_bins} spectral bins "
            f"of a ({rows}, {cols}) weight matrix")
    order = torch.argsort(radius, stable=True)
    group_of_rank = torch.arange(num_bins, dtype=torch.int64) * num_groups // num_bins
    group = torch.empty(num_bins, dtype=torch.int64)
    group[order] = group_of_rank
    return group.view(rows, cols // 2 + 1).to(device)


WHOLE_TRANSFORM_BYTES = 1 << 24
SLICE_BYTES = 1 << 22


def _slice_size(length: int, bytes_per_index: int) -> int:
    """How many indices of an axis to transform at once: all of them up to 16 MB, else slices of about 4 MB
    (small enough for cache and for glibc to reuse freed memory instead of mapping fresh pages)."""
    if length * bytes_per_index <= WHOLE_TRANSFORM_BYTES:
        return length
    return max(1, SLICE_BYTES // bytes_per_index)


def _scale_pairs(pairs: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[..., c] = pairs[..., c] * scale for the real and imaginary parts: two strided products run twice as
    fast on CPU as one product that broadcasts the scale over a 2-element inner axis."""
    for part in range(2):
        torch.mul(pairs[..., part], scale, out=out[..., part])
    return out


def _transpose(src: torch.Tensor, dst: torch.Tensor, fused: bool) -> None:
    """dst[b, j, i] = src[b, i, j] for complex (B, I, J) -> (B, J, I), blocked by ``native`` if ``fused``."""
    if fused:
        native.transpose(src, dst)
    else:
        dst.copy_(src.transpose(1, 2))


class FourierDisjointWeight(nn.Module):
    """Kernel stored as its half spectrum; synthesises per-sample kernels from per-group attention.

    ``spectrum`` is ``rfft2`` of the weight matrix (norm "backward") as real/imag pairs, stored column-major:
    shape (C, R, 2), entry [c, r] = bin (r, c), so that the per-sample inverse FFT along R reads contiguous
    memory. ``group_of_bin`` (R, C) is a persistent buffer so that a non-default grouping (e.g. a reference
    checkpoint's) travels with the weights.
    """

    def __init__(
            self,
            out_channels: int,
            in_channels_per_group: int,
            kernel_size: int,
            num_groups: int = 64,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.out_channels = out_channels
        self.in_channels_per_group = in_channels_per_group
        self.kernel_size = kernel_size
        self.num_groups = num_groups
        self.rows = out_channels * kernel_size
        self.cols = in_channels_per_group * kernel_size
        self.spectrum = nn.Parameter(torch.empty(self.cols // 2 + 1, self.rows, 2, **dd))
        group = radial_grouping(self.rows, self.cols, num_groups)
        self.register_buffer('group_of_bin', group.to(device=device), persistent=True)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        k = self.kernel_size
        return self.out_channels, self.in_channels_per_group, k, k

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Set the spectrum from a dense (Cout, Cg, k, k) weight; the FFT runs in float64 so it is exact."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"dense weight has shape {tuple(weight.shape)}, expected {self.weight_shape}")
        self.spectrum.copy_(dense_spectrum(weight).to(self.spectrum.dtype))

    @torch.no_grad()
    def set_grouping(self, group_of_bin: torch.Tensor) -> None:
        """Use a given bin -> group map (R, C) instead of the radial one."""
        shape = tuple(self.group_of_bin.shape)
        if tuple(group_of_bin.shape) != shape:
            raise ValueError(f"grouping has shape {tuple(group_of_bin.shape)}, expected {shape}")
        if group_of_bin.min() < 0 or group_of_bin.max() >= self.num_groups:
            raise ValueError(f"grouping holds group ids outside [0, {self.num_groups})")
        self.group_of_bin.copy_(group_of_bin)

    def static_weight(self) -> torch.Tensor:
        """The dense kernel the spectrum represents (all group attentions equal to 1)."""
        spec = torch.view_as_complex(self.spectrum.to(fft_dtype(self.spectrum.dtype))).t()
        matrix = torch.fft.irfft2(spec, s=(self.rows, self.cols))
        return matrix_to_weight(matrix, self.out_channels, self.kernel_size).contiguous()

    def forward(self, kernel_attention: torch.Tensor) -> torch.Tensor:
        """(B, n) attention per group -> per-sample weight matrices (B, Cout*k, Cg*k), at least float32."""
        dtype = fft_dtype(self.spectrum.dtype)
        b, (rows, half) = kernel_attention.shape[0], self.group_of_bin.shape
        # real/imag pairs times a real scale: no complex promotion of the (B, C, R) attention map
        scale = kernel_attention.to(dtype)[:, self._groups_by_column()].view(b, half, rows, 1)
        spec = torch.view_as_complex(self.spectrum.to(dtype) * scale).transpose(1, 2)
        return torch.fft.irfft2(spec, s=(self.rows, self.cols))

    def _groups_by_column(self) -> torch.Tensor:
        """``group_of_bin`` in column-major (C, R) order, flattened; cached until the buffer changes."""
        return self._column_major_groups()[0]

    def _column_major_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``group_of_bin`` in column-major order: flat int64 (C*R) for torch, (C, R) in the fused loops' index
        type (``native.group_index``); cached until the buffer changes."""
        group = self.group_of_bin
        key = (group.data_ptr(), group._version, group.device)
        if getattr(self, '_by_column_key', None) != key:
            by_column = group.t().contiguous()
            self._by_column = by_column.view(-1), native.group_index(by_column, self.num_groups)
            self._by_column_key = key
        return self._by_column

    def _slice_steps(self, batch_size: int) -> tuple[int, int]:
        """Rows per slice of the transforms along C and columns per slice of those along R (``_slice_size``),
        the same for the synthesis and its adjoint."""
        rows, half = self.group_of_bin.shape
        return _slice_size(rows, batch_size * self.cols * 4), _slice_size(half, batch_size * rows * 8)

    @torch.no_grad()
    def synthesize(self, kernel_attention: torch.Tensor, modulate: Modulation | None = None) -> torch.Tensor:
        """Same as ``forward`` without autograd, in the fewest passes over B x |W| floats; returns the matrices
        (B, R, Cg*k), times the modulation that ``modulate`` applies if given, fresh or (when sliced) in scratch
        memory valid until the next call. ``modulate`` sees each slice of rows while it is in cache, so the
        product costs no extra pass. Call :meth:`gradient` right after it for the adjoint.

        The modulated spectrum is written column-major, (C, B, R), so the inverse FFT along R reads contiguous
        rows, and both 1-D transforms run on slices of a few MB: their outputs (which torch allocates afresh)
        stay in cache and below glibc's mmap threshold, and the transposition between the two transforms is
        done slice by slice while the slice is in cache. torch's irfft2 would copy the whole spectrum into
        that order and back and return a fresh, page-faulting tensor. float32 on the CPU uses the fused loops
        of ``native`` for the group scaling and the transposition, and where torch has MKL's FFT, runs the
        whole synthesis (scaling, both transforms, transposition, modulation) as ``native.synthesize``: two
        passes over cache-sized blocks, 10-30% faster than these five.
        """
        dtype = fft_dtype(self.spectrum.dtype)
        b, (rows, half) = kernel_attention.shape[0], self.group_of_bin.shape
        device = kernel_attention.device
        spectrum, attention = self.spectrum.to(dtype), kernel_attention.to(dtype).contiguous()
        fused = native.usable(spectrum, attention)
        whole = modulate is None or isinstance(modulate, native.LocalModulation) and modulate.sigmoid_out is None
        if fused and whole and native.fft_usable():  # the transforms and the products in two fused passes
            matrix = scratch('fdw.matrix', (b, rows, self.cols), device, dtype)
            columns = scratch('fdw.rows', (rows, b, half, 2), device, dtype)
            if native.synthesize(spectrum, self._column_major_groups()[1], attention, columns, matrix, modulate):
                return matrix
        spec = scratch('fdw.spectrum', (half, b, rows, 2), device, dtype)
        if fused:
            native.scale_spectrum(spectrum, self._column_major_groups()[1], attention, spec)
        else:  # per-bin scales gathered from the groups, then two strided products
            scale = scratch('fdw.scale', (b, half, rows), device, dtype)
            torch.gather(attention, 1, self._groups_by_column().expand(b, -1), out=scale.view(b, -1))
            _scale_pairs(spectrum.unsqueeze(1), scale.transpose(0, 1), out=spec)
        spec = torch.view_as_complex(spec)
        row_step, column_step = self._slice_steps(b)
        if row_step == rows:  # one transform along C: rows in (B, R) order, its output is the result
            by_row = torch.view_as_complex(scratch('fdw.rows', (b, rows, half, 2), device, dtype))
            rows_first = by_row.transpose(0, 1)
        else:  # slices of rows must be contiguous: (R, B) order
            by_row = rows_first = torch.view_as_complex(scratch('fdw.rows', (rows, b, half, 2), device, dtype))
        for start in range(0, half, column_step):  # inverse along R, slice of columns -> (R, B, slice)
            columns = torch.fft.ifft(spec[start:start + column_step], dim=-1)
            _transpose(columns.transpose(0, 1), rows_first[:, :, start:start + column_step].transpose(0, 1), fused)
        if row_step == rows:
            matrix = torch.fft.irfft(by_row, n=self.cols, dim=-1)
            if modulate is not None:
                modulate(matrix, matrix, 0)
            return matrix
        matrix = scratch('fdw.matrix', (b, rows, self.cols), device, dtype)
        for start in range(0, rows, row_step):  # inverse real FFT along C, slice of rows
            part = torch.fft.irfft(by_row[start:start + row_step], n=self.cols, dim=-1).transpose(0, 1)
            if modulate is None:
                matrix[:, start:start + row_step].copy_(part)
            else:
                modulate(part, matrix[:, start:start + row_step], start)
        return matrix

    def gradient_buffer(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Scratch (B, R, Cg*k) for the gradient of the synthesised matrices (the modulated spectrum's memory,
        free once :meth:`synthesize` has returned)."""
        return scratch('fdw.spectrum', (batch_size, self.rows, self.cols), self.spectrum.device, dtype)

    @torch.no_grad()
    def gradient(self, grad_matrix: torch.Tensor, kernel_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint of :meth:`synthesize` (right after it): gradient of the matrices and the attention (B, n) it
        was given -> (gradient of the spectrum (C, R, 2), gradient of the group attention (B, n)).

        The adjoint of irfft2 is rfft2 / (R * Cg*k) with the half-spectrum columns that stand for two bins
        (all but DC and Nyquist) counted twice. The transforms run on slices as in :meth:`synthesize`, and the
        two reductions (per group for the attention, over the batch for the spectrum) consume each slice while
        it is in cache. ``grad_matrix`` may live in :meth:`gradient_buffer`. Where ``synthesize`` runs fused
        with MKL's FFT, so does this (``native.synthesis_gradient``).
        """
        dtype, device = grad_matrix.dtype, grad_matrix.device
        b, (rows, half) = grad_matrix.shape[0], self.group_of_bin.shape
        spectrum, attention = self.spectrum.to(dtype), kernel_attention.to(dtype).contiguous()
        fused = native.usable(grad_matrix, spectrum, attention)
        spec = torch.view_as_complex(scratch('fdw.rows', (half, b, rows, 2), device, dtype))
        weight = torch.full((half,), 2.0 / (rows * self.cols), device=device, dtype=dtype)
        weight[0] /= 2
        if self.cols % 2 == 0:
            weight[-1] /= 2
        grad_attention = torch.zeros(b, self.num_groups, device=device, dtype=dtype)
        grad_spectrum = torch.empty(half, rows, 2, device=device, dtype=dtype)
        groups, narrow_groups = self._column_major_groups()
        if fused and native.fft_usable() and native.synthesis_gradient(
                grad_matrix.contiguous(), spectrum, narrow_groups, weight, attention, torch.view_as_real(spec),
                grad_spectrum, grad_attention):  # both transforms and the adjoint in two fused passes
            return grad_spectrum, grad_attention
        row_step, column_step = self._slice_steps(b)
        by_row, by_column = grad_matrix.reshape(b * rows, self.cols), spec.view(half, b * rows)
        step = row_step * b  # slices of the (B*R) rows: contiguous, so the FFT reads them in place
        for start in range(0, b * rows, step):  # real FFT along C, slice of rows -> (C/2+1, slice)
            part = torch.fft.rfft(by_row[start:start + step], dim=-1)
            _transpose(part.unsqueeze(0), by_column[:, start:start + step].unsqueeze(0), fused)
        if not fused:
            groups = groups.view(half, rows)
            weighted = spectrum * weight[:, None, None]
            scale = torch.gather(attention, 1, groups.view(1, -1).expand(b, -1)).view(b, half, rows)
        for start in range(0, half, column_step):  # FFT along R, slice of columns -> (slice, B, R)
            stop = min(start + column_step, half)
            grad_spec = torch.view_as_real(torch.fft.fft(spec[start:stop], dim=-1))
            if fused:
                native.spectrum_adjoint(grad_spec, spectrum[start:stop], narrow_groups[start:stop], weight[start:stop],
                                        attention, grad_spectrum[start:stop], grad_attention)
                continue
            # d/d(scale of a bin) = <grad, spectrum> over real/imag, summed per group
            by_sample = grad_spec.transpose(0, 1)
            grad_scale = torch.empty((b, stop - start, rows), device=device, dtype=dtype)
            torch.mul(by_sample[..., 0], weighted[start:stop, :, 0], out=grad_scale)
            grad_scale.addcmul_(by_sample[..., 1], weighted[start:stop, :, 1])
            grad_attention.index_add_(1, groups[start:stop].reshape(-1), grad_scale.view(b, -1))
            pairs = _scale_pairs(grad_spec, scale[:, start:stop].transpose(0, 1), out=torch.empty_like(grad_spec))
            torch.sum(pairs, 1, out=grad_spectrum[start:stop]).mul_(weight[start:stop, None, None])
        return grad_spectrum, grad_attention

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, num_groups={self.num_groups}"
