"""C++ encoder and decoder of chunked Huffman streams (OpenMP over chunks), built on first use.

Every read of the stream is bounds-checked (bytes past the end read as zero) and every write is
bounded by the chunk's symbol count, so a corrupt stream can only produce wrong symbols or an
error status, never an out-of-bounds access. The Python side turns a status into a
:class:`~compress.errors.FormatError`.
"""

from __future__ import annotations

from types import ModuleType

from compress.utils.native import load_native

__all__ = ["native_module"]

_SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>
#include <cstdint>
#include <cstring>
#include <algorithm>

namespace {

inline uint64_t load_be64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

// 64 stream bits starting at bit `pos`, MSB-aligned; bytes past `nbytes` read as zero.
inline uint64_t peek(const uint8_t* s, int64_t nbytes, uint64_t pos) {
    int64_t byte = (int64_t)(pos >> 3);
    uint64_t v;
    if (byte + 8 <= nbytes) {
        v = load_be64(s + byte);
    } else {
        v = 0;
        for (int i = 0; i < 8; ++i) {
            int64_t b = byte + i;
            v = (v << 8) | (b < nbytes ? s[b] : 0);
        }
    }
    return v << (pos & 7);
}

// Two-symbol lookup entry (uint32): bits 0-7 first symbol, 8-15 second symbol, 16-20 bits
// consumed by the whole entry, 21-25 bits of the first symbol alone, 26-27 symbols (1 or 2),
// 31 = not a code (then it still consumes bits, so a corrupt lane keeps moving and ends).
struct ByteOut {
    uint8_t* o;
    inline void put(int64_t i, uint32_t v) const { o[i] = (uint8_t)v; }
};
struct Bf16Out {
    uint16_t* o;
    const uint8_t* r;
    inline void put(int64_t i, uint32_t e) const {
        uint16_t v = r[i];
        o[i] = (uint16_t)(((v & 0x80) << 8) | ((e & 0xFF) << 7) | (v & 0x7F));
    }
};

template <typename Out>
struct Lane {
    uint64_t pos, end;
    int64_t i, count;
    uint32_t bad;
    Out out;
};

// One peek, then `lookups` table lookups of up to two symbols each; needs i + 2*lookups <= count.
template <typename Out>
inline void fast_step(Lane<Out>& l, const uint8_t* s, int64_t nbytes, const uint32_t* lut,
                      int bits, int lookups) {
    uint64_t w = peek(s, nbytes, l.pos);
    const int shift = 64 - bits;
    for (int j = 0; j < lookups; ++j) {
        uint32_t e = lut[w >> shift];
        uint32_t length = (e >> 16) & 31;
        l.out.put(l.i, e);
        l.out.put(l.i + 1, e >> 8);
        l.bad |= e >> 31;
        l.i += (e >> 26) & 3;
        w <<= length;
        l.pos += length;
    }
}

// One symbol at a time up to the lane's count; 0 or a nonzero status for a corrupt chunk.
template <typename Out>
inline int finish(Lane<Out>& l, const uint8_t* s, int64_t nbytes, const uint32_t* lut, int bits) {
    const int shift = 64 - bits;
    while (l.i < l.count) {
        uint32_t e = lut[peek(s, nbytes, l.pos) >> shift];
        uint32_t length = (e >> 21) & 31;
        l.out.put(l.i, e);
        l.bad |= e >> 31;
        l.i += 1;
        l.pos += length;
    }
    if (l.pos > l.end) return 2;
    if (l.bad) return 1;
    if (l.end - l.pos >= 8) return 3;
    return 0;
}

constexpr int kLanes = 4;  // chunks decoded interleaved by one thread, to overlap lookups

struct Chunks {
    const uint8_t* stream;
    int64_t nbytes;
    const int64_t* offsets;
    int64_t n_chunks;
    int64_t chunk;
    int64_t total;
};

// Offsets must be byte-aligned starts, nondecreasing, inside the stream.
int check_offsets(const Chunks& c) {
    if (c.offsets[0] != 0) return 10;
    for (int64_t k = 0; k < c.n_chunks; ++k) {
        if (c.offsets[k + 1] < c.offsets[k] || (c.offsets[k] & 7)) return 11;
    }
    if (c.offsets[c.n_chunks] > c.nbytes * 8) return 12;
    return 0;
}

Chunks chunks_of(const torch::Tensor& stream, const torch::Tensor& offsets, int64_t chunk,
                 int64_t total) {
    TORCH_CHECK(stream.dtype() == torch::kUInt8 && stream.is_contiguous(), "stream: uint8");
    TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous(), "offsets: int64");
    Chunks c;
    c.stream = stream.data_ptr<uint8_t>();
    c.nbytes = stream.numel();
    c.offsets = offsets.data_ptr<int64_t>();
    c.n_chunks = offsets.numel() - 1;
    c.chunk = chunk;
    c.total = total;
    return c;
}

// Decode chunks [first, first + lanes) interleaved; returns (status, bad chunk) packed.
template <typename Out, typename MakeOut>
int64_t decode_group(const Chunks& c, const uint32_t* lut, int bits, int64_t first,
                     MakeOut make_out) {
    Lane<Out> lanes[kLanes];
    int n = (int)std::min<int64_t>(kLanes, c.n_chunks - first);
    for (int j = 0; j < n; ++j) {
        int64_t k = first + j, start = k * c.chunk;
        lanes[j] = Lane<Out>{(uint64_t)c.offsets[k], (uint64_t)c.offsets[k + 1], 0,
                             std::min(c.chunk, c.total - start), 0, make_out(start)};
    }
    const int lookups = 57 / bits;
    const int64_t margin = 2 * lookups;
    if (n == kLanes) {
        while (true) {
            bool more = false;
            for (int j = 0; j < kLanes; ++j) {
                if (lanes[j].count - lanes[j].i >= margin) {
                    fast_step(lanes[j], c.stream, c.nbytes, lut, bits, lookups);
                    more = true;
                }
            }
            if (!more) break;
        }
    } else {
        for (int j = 0; j < n; ++j)
            while (lanes[j].count - lanes[j].i >= margin)
                fast_step(lanes[j], c.stream, c.nbytes, lut, bits, lookups);
    }
    for (int j = 0; j < n; ++j) {
        int st = finish(lanes[j], c.stream, c.nbytes, lut, bits);
        if (st) return (int64_t)st * 1000000 + first + j;
    }
    return 0;
}

template <typename Out, typename MakeOut>
int64_t run_chunks(const Chunks& c, const uint32_t* lut, int bits, int threads,
                   MakeOut make_out) {
    int status = check_offsets(c);
    if (status) return (int64_t)status * 1000000;
    int64_t groups = (c.n_chunks + kLanes - 1) / kLanes;
    int64_t worst = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t g = 0; g < groups; ++g) {
        int64_t st = decode_group<Out>(c, lut, bits, g * kLanes, make_out);
        if (st) {
            #pragma omp critical
            { if (worst == 0 || st % 1000000 < worst % 1000000) worst = st; }
        }
    }
    return worst;
}

}  // namespace

// Symbols -> (per-chunk bit counts) so the caller can lay out byte-aligned chunk offsets.
torch::Tensor chunk_bits(torch::Tensor symbols, torch::Tensor lengths, int64_t chunk,
                         int64_t threads) {
    const uint8_t* sym = symbols.data_ptr<uint8_t>();
    const uint8_t* len = lengths.data_ptr<uint8_t>();
    int64_t total = symbols.numel();
    int64_t n_chunks = (total + chunk - 1) / chunk;
    auto out = torch::empty({n_chunks}, torch::kInt64);
    int64_t* bits = out.data_ptr<int64_t>();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < n_chunks; ++k) {
        int64_t start = k * chunk, stop = std::min(total, start + chunk), acc = 0;
        for (int64_t i = start; i < stop; ++i) acc += len[sym[i]];
        bits[k] = acc;
    }
    return out;
}

// Write every chunk at its (byte-aligned) offset; `stream` must be zero-filled.
void encode(torch::Tensor symbols, torch::Tensor lengths, torch::Tensor codes,
            torch::Tensor offsets, int64_t chunk, torch::Tensor stream, int64_t threads) {
    const uint8_t* sym = symbols.data_ptr<uint8_t>();
    const uint8_t* len = lengths.data_ptr<uint8_t>();
    const int32_t* code = codes.data_ptr<int32_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    uint8_t* out = stream.data_ptr<uint8_t>();
    int64_t total = symbols.numel();
    int64_t n_chunks = offsets.numel() - 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < n_chunks; ++k) {
        int64_t start = k * chunk, stop = std::min(total, start + chunk);
        uint8_t* p = out + off[k] / 8;
        uint64_t acc = 0;  // pending bits, MSB-first in the low `filled` bits
        int filled = 0;
        for (int64_t i = start; i < stop; ++i) {
            int n = len[sym[i]];
            acc = (acc << n) | (uint64_t)code[sym[i]];
            filled += n;
            while (filled >= 8) {
                filled -= 8;
                *p++ = (uint8_t)(acc >> filled);
            }
        }
        if (filled) *p = (uint8_t)(acc << (8 - filled));
    }
}

// Decode symbols into `out` (uint8, `total` elements). Returns 0 or status*1e6 + chunk.
int64_t decode(torch::Tensor stream, torch::Tensor offsets, torch::Tensor lut, int64_t bits,
               int64_t chunk, int64_t total, torch::Tensor out, int64_t threads) {
    Chunks c = chunks_of(stream, offsets, chunk, total);
    const uint32_t* table = (const uint32_t*)lut.data_ptr<int32_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    return run_chunks<ByteOut>(c, table, (int)bits, (int)threads,
                               [dst](int64_t start) { return ByteOut{dst + start}; });
}

// Decode exponents and merge them with the raw sign+mantissa bytes into BF16 bit patterns.
int64_t decode_bf16(torch::Tensor stream, torch::Tensor offsets, torch::Tensor lut, int64_t bits,
                    int64_t chunk, int64_t total, torch::Tensor raw, torch::Tensor out,
                    int64_t threads) {
    Chunks c = chunks_of(stream, offsets, chunk, total);
    const uint32_t* table = (const uint32_t*)lut.data_ptr<int32_t>();
    const uint8_t* sm = raw.data_ptr<uint8_t>();
    uint16_t* dst = (uint16_t*)out.data_ptr<int16_t>();
    return run_chunks<Bf16Out>(c, table, (int)bits, (int)threads, [dst, sm](int64_t start) {
        return Bf16Out{dst + start, sm + start};
    });
}

// BF16 bit patterns -> (exponent bytes, sign+mantissa bytes).
void split_bf16(torch::Tensor values, torch::Tensor exponents, torch::Tensor raw,
                int64_t threads) {
    const uint16_t* v = (const uint16_t*)values.data_ptr<int16_t>();
    uint8_t* e = exponents.data_ptr<uint8_t>();
    uint8_t* r = raw.data_ptr<uint8_t>();
    int64_t n = values.numel();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
        uint16_t x = v[i];
        e[i] = (uint8_t)((x >> 7) & 0xFF);
        r[i] = (uint8_t)(((x >> 8) & 0x80) | (x & 0x7F));
    }
}
"""

_FUNCTIONS = ["chunk_bits", "encode", "decode", "decode_bf16", "split_bf16"]


def native_module() -> ModuleType | None:
    """The compiled codec, or None (logged once) where no compiler is available."""
    return load_native("entropy_codec", _SOURCE, _FUNCTIONS)
