"""``FactoredMatrix``: a low-rank matrix ``A @ B`` kept as its two factors (TransformerLens's API on MLX).

``A`` is [..., ldim, mdim] and ``B`` is [..., mdim, rdim]; leading dims broadcast (e.g. [L, H] for
``model.OV``). Most operations never form the [ldim, rdim] product: ``svd`` goes through QR of each
factor and an SVD of the small [mdim, mdim] core, ``eigenvalues`` through ``B @ A``.

SVD, QR and eigenvalues are not implemented on MLX's GPU backends: they run on the CPU stream
(``stream=mx.cpu``) whatever the default device is. Everything else runs on the default stream.
"""

from __future__ import annotations

from functools import cached_property

import mlx.core as mx


class FactoredMatrix:
    """The matrix ``A @ B`` [..., ldim, rdim], stored as ``A`` [..., ldim, mdim] and ``B`` [..., mdim, rdim].

    TL conventions: ``svd()`` returns ``(U, S, Vh)`` with ``AB = U @ diag(S) @ Vh.T`` -- TL's ``Vh`` is
    V (columns = right singular vectors), not V transposed. ``norm()`` is the Frobenius norm over the
    last two dims. Indexing selects leading (batch) dims, then rows, then columns.
    """

    def __init__(self, A: mx.array, B: mx.array):
        A, B = mx.array(A), mx.array(B)
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix needs A and B with at least 2 dims; got {A.shape} and {B.shape}.")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix: inner dims differ: A {tuple(A.shape)} @ B {tuple(B.shape)}; "
                             f"A's last dim must equal B's second-to-last.")
        lead = tuple(mx.broadcast_shapes(A.shape[:-2], B.shape[:-2]))
        self.A = mx.broadcast_to(A, lead + tuple(A.shape[-2:]))
        self.B = mx.broadcast_to(B, lead + tuple(B.shape[-2:]))
        self.ldim, self.mdim = A.shape[-2:]
        self.rdim = B.shape[-1]
        self.has_leading_dims = bool(lead)
        self.shape = lead + (self.ldim, self.rdim)

    # -- products --------------------------------------------------------------------------------
    @property
    def AB(self) -> mx.array:
        """The full matrix [..., ldim, rdim]."""
        return self.A @ self.B

    @property
    def BA(self) -> mx.array:
        """``B @ A`` [..., mdim, mdim] (needs ldim == rdim); it has the non-zero eigenvalues of ``AB``."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square factored matrix; this one is {self.ldim} x {self.rdim}.")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.swapaxes(-1, -2), self.A.swapaxes(-1, -2))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
            return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
        other = mx.array(other)
        if other.ndim == 1:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other):
        """``other @ self``. Note: ``mx.array.__matmul__`` raises instead of deferring to this method, so for
        an ``mx.array`` on the left write ``fm.rmatmul(x)`` (lists / scalars on the left work with @)."""
        return self.rmatmul(other)

    def rmatmul(self, other) -> FactoredMatrix | mx.array:
        """``other @ self``: a matrix [..., n, ldim] gives a FactoredMatrix, a vector [ldim] an array."""
        other = mx.array(other)
        if other.ndim == 1:
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar):
        if isinstance(scalar, mx.array) and scalar.size != 1:
            raise TypeError("A FactoredMatrix multiplies only by a scalar; use @ for matrix products.")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self * (1.0 / scalar)

    # -- decompositions (CPU stream) --------------------------------------------------------------
    def svd(self) -> tuple[mx.array, mx.array, mx.array]:
        """``(U, S, Vh)``: ``AB = U @ diag(S) @ Vh.T`` (TL convention), U [..., ldim, mdim], S [..., mdim],
        Vh [..., rdim, mdim], S descending. Runs on the CPU stream (MLX has no GPU SVD/QR): QR of A and of
        B.T, then an SVD of the [mdim, mdim] core -- the [ldim, rdim] product is never formed."""
        return self._svd

    @cached_property
    def _svd(self):
        cpu = mx.cpu
        A = self.A.astype(mx.float32)
        B = self.B.astype(mx.float32)
        k = self.mdim
        if k > min(self.ldim, self.rdim):  # the core would be larger than the product: decompose AB
            U, S, Vt = mx.linalg.svd(A @ B, stream=cpu)
            r = min(self.ldim, self.rdim)
            return U[..., :r], S, Vt[..., :r, :].swapaxes(-1, -2)
        Qa, Ra = mx.linalg.qr(A, stream=cpu)  # [.., l, k], [.., k, k]
        Qb, Rb = mx.linalg.qr(B.swapaxes(-1, -2), stream=cpu)  # [.., r, k], [.., k, k]
        core = Ra @ Rb.swapaxes(-1, -2)
        Um, S, Vmt = mx.linalg.svd(core, stream=cpu)
        U = Qa @ Um
        V = Qb @ Vmt.swapaxes(-1, -2)
        mx.eval(U, S, V)
        return U, S, V

    @property
    def U(self) -> mx.array:
        return self.svd()[0]

    @property
    def S(self) -> mx.array:
        return self.svd()[1]

    @property
    def Vh(self) -> mx.array:
        """V (TL's name): [..., rdim, mdim], so that ``AB = U @ diag(S) @ Vh.T``."""
        return self.svd()[2]

    @property
    def eigenvalues(self) -> mx.array:
        """Eigenvalues [..., mdim] (complex64) of ``BA``: the non-zero eigenvalues of ``AB`` (needs a square
        matrix). Runs on the CPU stream (MLX has no GPU eigensolver)."""
        return mx.linalg.eigvals(self.BA.astype(mx.float32), stream=mx.cpu)

    def norm(self) -> mx.array:
        """Frobenius norm [...] of ``AB``, from the singular values."""
        return mx.sqrt(mx.sum(mx.square(self.S), axis=-1))

    # -- shape helpers -----------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> FactoredMatrix:
        """Index leading dims; an index one past them selects rows (of A), two past them columns (of B)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        n = len([i for i in idx if i is not None])
        if n <= self.ndim - 2:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if n == self.ndim - 1:
            return FactoredMatrix(self.A[idx[:-1] + (_as_slice(idx[-1]),)], self.B[idx[:-1]])
        if n == self.ndim:
            lead = idx[:-2]
            return FactoredMatrix(self.A[lead + (_as_slice(idx[-2]),)],
                                  self.B[lead + (slice(None), _as_slice(idx[-1]))])
        raise IndexError(f"Too many indices ({n}) for a FactoredMatrix of shape {self.shape}.")

    def get_corner(self, k: int = 3) -> mx.array:
        """The top-left k x k corner of AB (of the first element of each leading dim), cheaply."""
        A = self.A[(0,) * (self.ndim - 2)] if self.has_leading_dims else self.A
        B = self.B[(0,) * (self.ndim - 2)] if self.has_leading_dims else self.B
        return A[:k] @ B[:, :k]

    def unsqueeze(self, axis: int = 0) -> FactoredMatrix:
        if axis < 0:
            axis = self.ndim + 1 + axis
        if axis > self.ndim - 2:
            raise ValueError("unsqueeze only adds leading dims.")
        return FactoredMatrix(mx.expand_dims(self.A, axis), mx.expand_dims(self.B, axis))

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={self.shape}, hidden dim {self.mdim})"


def _as_slice(i):
    """An integer row/column index becomes a length-1 slice, so a FactoredMatrix stays 2-D."""
    if isinstance(i, int):
        return slice(i, i + 1 if i != -1 else None)
    return i
