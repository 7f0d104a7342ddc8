"""Payloads of the activation exchange: how each rank's slice travels in one Allgatherv.

Pure functions of the slice widths; the MPI call itself lives in ``comm.py``.

A rank's slice of a (T, total) activation is a (T, width) float32 block. With payload
``q80`` each row of it is zero-padded to whole 32-value blocks and quantized to Q8_0
(34 bytes per 32 values); with ``f32`` it travels as raw float32. The receive buffer is the
concatenation of every rank's payload in rank order, and every rank decodes the same bytes
with the same code, so the reassembled activation is bit-identical on all ranks, including the
rank's own slice (it uses the rounded copy it sent, not its exact float values).
"""
import numpy as np

from .quant import dequantize_q80, quantize_q80

BLOCK = 32
Q80_BLOCK_BYTES = 34
PAYLOADS = ("q80", "f32")


def displacements(counts):
    """Start offsets of consecutive segments of `counts` items (MPI's displs), as ints."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()


class SliceExchange:
    """Byte layout of one Allgatherv of per-rank slices of widths `widths` (values per row).
    codec: the kernels backend (dllm.backend) whose quantize_q80 / dequantize_q80 code the
    Q8_0 payload (compiled twins give quant.py's bytes and values, tested); None: quant.py's
    numpy functions."""

    def __init__(self, widths, payload, codec=None):
        if payload not in PAYLOADS:
            raise ValueError(f"unknown sync payload {payload!r}; use one of {PAYLOADS}")
        self.widths = [int(w) for w in widths]
        self.payload, self.codec = payload, codec
        self.quantize = codec.quantize_q80 if codec else quantize_q80
        self.dequantize = codec.dequantize_q80 if codec else dequantize_q80
        self._counts = {}
        self.offsets = np.concatenate([[0], np.cumsum(self.widths)]).astype(int).tolist()
        self.total = self.offsets[-1]
        if payload == "q80":
            self.row_bytes = [-(-w // BLOCK) * Q80_BLOCK_BYTES for w in self.widths]
        else:
            self.row_bytes = [w * 4 for w in self.widths]
        # every slice whole Q8_0 blocks: the payload's blocks are the activation's own
        self.whole_blocks = payload == "q80" and all(w % BLOCK == 0 for w in self.widths)

    def counts(self, T):
        """Per-rank byte counts and displacements for a block of T rows (computed once per
        T: this runs four times per layer and token)."""
        if T not in self._counts:
            counts = [T * b for b in self.row_bytes]
            self._counts[T] = counts, displacements(counts)
        return self._counts[T]

    def pack(self, local, rank):
        """(T, widths[rank]) float32 -> flat uint8 payload of this rank."""
        local = np.ascontiguousarray(local, dtype=np.float32)
        if self.payload == "f32":
            return local.reshape(-1).view(np.uint8)
        T, width = local.shape
        padded_width = self.row_bytes[rank] // Q80_BLOCK_BYTES * BLOCK
        if padded_width != width:
            local = np.pad(local, ((0, 0), (0, padded_width - width)))
        return self.quantize(local).reshape(-1)

    def unpack(self, received, T, out=None):
        """Flat uint8 buffer of every rank's payload -> (T, total) float32."""
        if out is None:
            out = np.empty((T, self.total), dtype=np.float32)
        counts, displs = self.counts(T)
        for r, width in enumerate(self.widths):
            if width == 0:
                continue
            segment = received[displs[r]:displs[r] + counts[r]].reshape(T, self.row_bytes[r])
            dest = out[:, self.offsets[r]:self.offsets[r + 1]]
            if self.payload == "f32":
                dest[...] = segment.view(np.float32)
            elif width % BLOCK == 0:
                self.dequantize(segment, out=dest)
            else:
                dest[...] = self.dequantize(segment)[:, :width]
        return out

    def unpack_input(self, received, T, kernels):
        """Flat buffer of every rank's payload -> the matmul input of the (T, total)
        activation for `kernels` (a backend, or a kvcache step's): what
        kernels.quantize_input(unpack(received, T)) gives. Where every slice is whole Q8_0
        blocks, quantizing the received values again would give back the received bytes
        (Q8_0 of Q8_0 values is the identity: tested), so kernels.input_from_q80 makes the
        input from the bytes, without the float32 round trip."""
        if not self.whole_blocks:
            return kernels.quantize_input(self.unpack(received, T))
        counts, displs = self.counts(T)
        rows = [received[displs[r]:displs[r] + counts[r]].reshape(T, self.row_bytes[r])
                for r, width in enumerate(self.widths) if width]
        return kernels.input_from_q80(rows[0] if len(rows) == 1 else np.hstack(rows))

    def bytes_received(self, rank, T=1):
        """Payload bytes `rank` receives from the others for T rows."""
        return T * (sum(self.row_bytes) - self.row_bytes[rank])

    def bytes_sent(self, rank, T=1):
        """Payload bytes of `rank` delivered to each of the other ranks (counted once per
        receiver, whatever algorithm MPI uses), so that sent and received balance."""
        return T * self.row_bytes[rank] * (len(self.widths) - 1)
