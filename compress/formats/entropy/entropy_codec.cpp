// Chunked Huffman encoder and decoder of compress's entropy-coded weights (see native.py).
#include <torch/extension.h>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <cstring>
#include <algorithm>
#include <thread>
#include <vector>

namespace {

// fn(i) for i in [0, n) on up to `threads` threads (the caller is one of them), dynamic order.
// Helpers are detached threads that join in only if they start before the caller has run out of
// work: on a busy machine a helper may get a core late or never, and the caller then neither
// waits for it to start nor for it to exit. A helper that did join in is waited for.
struct PoolState {
    std::atomic<int64_t> next{0};
    std::atomic<int> active{0};
    std::atomic<bool> open{true};
    std::mutex lock;
    std::condition_variable done;
};

template <typename F>
void parallel_for(int64_t n, int64_t threads, F fn) {
    int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(threads, n) - 1);
    if (helpers == 0) {
        for (int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
    auto state = std::make_shared<PoolState>();
    F* job = &fn;
    for (int64_t t = 0; t < helpers; ++t) {
        std::thread([state, job, n]() {
            state->active.fetch_add(1);
            if (state->open.load()) {
                for (int64_t i = state->next.fetch_add(1); i < n; i = state->next.fetch_add(1))
                    (*job)(i);
            }
            {
                std::lock_guard<std::mutex> guard(state->lock);
                state->active.fetch_sub(1);
            }
            state->done.notify_all();
        }).detach();
    }
    for (int64_t i = state->next.fetch_add(1); i < n; i = state->next.fetch_add(1)) fn(i);
    state->open.store(false);  // helpers that start from now on leave `fn` alone
    std::unique_lock<std::mutex> guard(state->lock);
    state->done.wait(guard, [&]() { return state->active.load() == 0; });
}

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
    std::vector<int64_t> statuses(groups, 0);
    // a helper thread costs about as much as decoding one group: give each at least two
    parallel_for(groups, std::min<int64_t>(threads, (groups + 1) / 2), [&](int64_t g) {
        statuses[g] = decode_group<Out>(c, lut, bits, g * kLanes, make_out);
    });
    for (int64_t st : statuses)
        if (st) return st;  // the first bad chunk
    return 0;
}

// ---- BF16 exponents coded in pairs (codec version 2) -----------------------------------------
// single: 2**T uint32 entries for codes of <= T bits (bytes e0 | e1 << 8 | length << 16); bit 31
//   set = the window starts a longer code or none.
// fast: 2**T uint64 entries that decode one or two pair codes fitting in T bits: exponent bytes
//   in bits 0-31, bits consumed in 32-39, exponents produced (2 or 4) in 40-47; 0 = slow path.
// Codes longer than T (rare pairs) are decoded canonically: per length its first code, count and
// first index into `sorted` (the pairs' bytes in canonical order). Building these is cheap, so
// small tensors do not pay for a 2**L table.
struct PairTables {
    std::vector<uint32_t> single;
    std::vector<uint64_t> fast;
    std::vector<uint16_t> sorted;
    uint32_t first[17], count[17], offset[17];
    int L, T;
};

PairTables pair_tables(const uint8_t* symbols, int64_t alphabet, const uint8_t* lengths, int L,
                       int T) {
    PairTables t;
    t.L = L;
    t.T = T = std::min(T, L);
    int64_t pairs = alphabet * alphabet;
    for (int len = 0; len <= 16; ++len) t.first[len] = t.count[len] = t.offset[len] = 0;
    for (int64_t p = 0; p < pairs; ++p)
        if (lengths[p] >= 1 && lengths[p] <= L) t.count[lengths[p]]++;
    uint32_t code = 0, index = 0;
    for (int len = 1; len <= L; ++len) {  // canonical: by length, then by pair index
        code = (code + t.count[len - 1]) << 1;
        t.first[len] = code;
        t.offset[len] = index;
        index += t.count[len];
    }
    t.sorted.assign(index, 0);
    std::vector<uint32_t> next(t.offset, t.offset + 17);
    const uint32_t invalid = 1u << 31;
    t.single.assign((size_t)1 << T, invalid);
    for (int64_t p = 0; p < pairs; ++p) {
        int len = lengths[p];
        if (len < 1 || len > L) continue;
        uint16_t bytes = (uint16_t)(symbols[p / alphabet] | (symbols[p % alphabet] << 8));
        uint32_t k = next[len]++;
        t.sorted[k] = bytes;
        if (len > T) continue;
        uint64_t lo = (uint64_t)(t.first[len] + (k - t.offset[len])) << (T - len);
        uint64_t hi = std::min<uint64_t>(lo + ((uint64_t)1 << (T - len)), t.single.size());
        for (uint64_t i = lo; i < hi; ++i) t.single[i] = bytes | ((uint32_t)len << 16);
    }
    t.fast.assign((size_t)1 << T, 0);
    const uint64_t mask = ((uint64_t)1 << T) - 1;
    for (uint64_t idx = 0; idx <= mask; ++idx) {
        uint32_t f1 = t.single[idx];
        if (f1 >> 31) continue;
        uint32_t len1 = (f1 >> 16) & 31;
        uint32_t f2 = t.single[(idx << len1) & mask];
        uint32_t len2 = (f2 >> 16) & 31;
        if (!(f2 >> 31) && len1 + len2 <= (uint32_t)T) {
            t.fast[idx] = (uint64_t)(f1 & 0xFFFF) | ((uint64_t)(f2 & 0xFFFF) << 16) |
                          ((uint64_t)(len1 + len2) << 32) | ((uint64_t)4 << 40);
        } else {
            t.fast[idx] = (uint64_t)(f1 & 0xFFFF) | ((uint64_t)len1 << 32) | ((uint64_t)2 << 40);
        }
    }
    return t;
}

// One pair from the MSB-aligned window `w`: bytes | length << 16, bit 31 = not a code (then
// length L, so a corrupt lane keeps moving).
inline uint32_t decode_pair(const PairTables& t, uint64_t w) {
    uint32_t f = t.single[w >> (64 - t.T)];
    if (!(f >> 31)) return f;
    for (int len = t.T + 1; len <= t.L; ++len) {
        uint32_t k = (uint32_t)(w >> (64 - len)) - t.first[len];
        if (k < t.count[len]) return t.sorted[t.offset[len] + k] | ((uint32_t)len << 16);
    }
    return (1u << 31) | ((uint32_t)t.L << 16);
}

struct PairLane {
    uint64_t pos, end;
    int64_t i, count;
    uint32_t bad;
    uint8_t* buf;  // the chunk's exponents, with 16 bytes of slack
};

// One peek, then `lookups` lookups of 2 or 4 exponents each; needs i + 4*lookups <= count.
// The lane state lives in locals: stores through the uint8_t buffer may alias anything, so
// fields read through `l` would be reloaded after every store.
inline void pair_step(PairLane& l, const uint8_t* s, int64_t nbytes, const PairTables& t,
                      int lookups) {
    uint64_t pos = l.pos;
    uint64_t w = peek(s, nbytes, pos);
    const int fast_shift = 64 - t.T;
    const uint64_t* __restrict__ fast = t.fast.data();
    uint8_t* __restrict__ buf = l.buf;
    int64_t i = l.i;
    uint32_t bad = l.bad;
    for (int j = 0; j < lookups; ++j) {
        uint64_t e = fast[w >> fast_shift];
        uint32_t n = (uint32_t)(e >> 40);
        uint32_t length;
        if (__builtin_expect(n != 0, 1)) {
            uint32_t bytes = (uint32_t)e;
            std::memcpy(buf + i, &bytes, 4);
            length = (uint32_t)(e >> 32) & 0xFF;
        } else {
            uint32_t f = decode_pair(t, w);
            uint16_t bytes = (uint16_t)f;
            std::memcpy(buf + i, &bytes, 2);
            length = (f >> 16) & 31;
            bad |= f >> 31;
            n = 2;
        }
        i += n;
        w <<= length;
        pos += length;
    }
    l.pos = pos;
    l.i = i;
    l.bad = bad;
}

inline int pair_finish(PairLane& l, const uint8_t* s, int64_t nbytes, const PairTables& t) {
    while (l.i < l.count) {
        uint32_t f = decode_pair(t, peek(s, nbytes, l.pos));
        uint16_t bytes = (uint16_t)f;
        std::memcpy(l.buf + l.i, &bytes, 2);
        l.bad |= f >> 31;
        l.i += 2;
        l.pos += (f >> 16) & 31;
    }
    if (l.pos > l.end) return 2;
    if (l.bad) return 1;
    if (l.end - l.pos >= 8) return 3;
    return 0;
}

// exponent bytes + sign (bit 7) and mantissa (bits 0-6) bytes -> BF16 bit patterns
inline void merge_bf16(const uint8_t* __restrict__ e, const uint8_t* __restrict__ r,
                       uint16_t* __restrict__ o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
        uint16_t v = r[k];
        o[k] = (uint16_t)(((v & 0x80) << 8) | ((uint16_t)e[k] << 7) | (v & 0x7F));
    }
}

int64_t pair_group(const Chunks& c, const PairTables& t, const uint8_t* raw, uint16_t* out,
                   int64_t first) {
    thread_local std::vector<uint8_t> buffers;
    const int64_t stride = c.chunk + 16;
    if ((int64_t)buffers.size() < kLanes * stride) buffers.resize(kLanes * stride);
    PairLane lanes[kLanes];
    int n = (int)std::min<int64_t>(kLanes, c.n_chunks - first);
    for (int j = 0; j < n; ++j) {
        int64_t k = first + j, start = k * c.chunk;
        lanes[j] = PairLane{(uint64_t)c.offsets[k], (uint64_t)c.offsets[k + 1], 0,
                            std::min(c.chunk, c.total - start), 0, buffers.data() + j * stride};
    }
    const int lookups = 57 / t.L;
    const int64_t margin = 4 * lookups;
    if (n == kLanes) {
        // rounds of unchecked steps: each step writes at most `margin` exponents
        while (true) {
            int64_t room = lanes[0].count - lanes[0].i;
            for (int j = 1; j < kLanes; ++j) room = std::min(room, lanes[j].count - lanes[j].i);
            int64_t rounds = room / margin;
            if (rounds == 0) break;
            for (int64_t r = 0; r < rounds; ++r)
                for (int j = 0; j < kLanes; ++j)
                    pair_step(lanes[j], c.stream, c.nbytes, t, lookups);
        }
    }
    for (int j = 0; j < n; ++j)
        while (lanes[j].count - lanes[j].i >= margin)
            pair_step(lanes[j], c.stream, c.nbytes, t, lookups);
    for (int j = 0; j < n; ++j) {
        int st = pair_finish(lanes[j], c.stream, c.nbytes, t);
        if (st) return (int64_t)st * 1000000 + first + j;
        int64_t start = (first + j) * c.chunk;
        merge_bf16(lanes[j].buf, raw + start, out + start, lanes[j].count);
    }
    return 0;
}

template <typename Sym>
void chunk_bits_impl(const Sym* sym, const uint8_t* len, int64_t total, int64_t chunk,
                     int64_t* bits, int64_t threads) {
    int64_t n_chunks = (total + chunk - 1) / chunk;
    parallel_for(n_chunks, threads, [&](int64_t k) {
        int64_t start = k * chunk, stop = std::min(total, start + chunk), acc = 0;
        for (int64_t i = start; i < stop; ++i) acc += len[sym[i]];
        bits[k] = acc;
    });
}

template <typename Sym>
void encode_impl(const Sym* sym, const uint8_t* len, const int32_t* code, const int64_t* off,
                 int64_t total, int64_t n_chunks, int64_t chunk, uint8_t* out, int64_t threads) {
    parallel_for(n_chunks, threads, [&](int64_t k) {
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
    });
}

}  // namespace

// Symbols (uint8, or int32 pair indices) -> per-chunk bit counts, for byte-aligned offsets.
torch::Tensor chunk_bits(torch::Tensor symbols, torch::Tensor lengths, int64_t chunk,
                         int64_t threads) {
    const uint8_t* len = lengths.data_ptr<uint8_t>();
    int64_t total = symbols.numel();
    auto out = torch::empty({(total + chunk - 1) / chunk}, torch::kInt64);
    int64_t* bits = out.data_ptr<int64_t>();
    if (symbols.dtype() == torch::kInt32)
        chunk_bits_impl(symbols.data_ptr<int32_t>(), len, total, chunk, bits, threads);
    else
        chunk_bits_impl(symbols.data_ptr<uint8_t>(), len, total, chunk, bits, threads);
    return out;
}

// Write every chunk at its (byte-aligned) offset; `stream` must be zero-filled.
void encode(torch::Tensor symbols, torch::Tensor lengths, torch::Tensor codes,
            torch::Tensor offsets, int64_t chunk, torch::Tensor stream, int64_t threads) {
    const uint8_t* len = lengths.data_ptr<uint8_t>();
    const int32_t* code = codes.data_ptr<int32_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    uint8_t* out = stream.data_ptr<uint8_t>();
    int64_t n_chunks = offsets.numel() - 1;
    if (symbols.dtype() == torch::kInt32)
        encode_impl(symbols.data_ptr<int32_t>(), len, code, off, symbols.numel(), n_chunks, chunk,
                    out, threads);
    else
        encode_impl(symbols.data_ptr<uint8_t>(), len, code, off, symbols.numel(), n_chunks, chunk,
                    out, threads);
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

// Decode BF16 whose exponents are coded in pairs: lengths (A*A,) uint8, pair i*A+j = the bytes
// symbols[i], symbols[j], codes <= L bits; `fast_bits` sizes the first-level table (a decoder
// choice, not part of the format). Returns 0 or status*1e6 + chunk.
int64_t decode_bf16_pairs(torch::Tensor stream, torch::Tensor offsets, torch::Tensor symbols,
                          torch::Tensor lengths, int64_t max_length, int64_t fast_bits,
                          int64_t chunk, int64_t total, torch::Tensor raw, torch::Tensor out,
                          int64_t threads) {
    TORCH_CHECK(symbols.dtype() == torch::kUInt8 && lengths.dtype() == torch::kUInt8, "uint8");
    TORCH_CHECK(lengths.numel() == symbols.numel() * symbols.numel(), "lengths: (A*A,)");
    TORCH_CHECK(max_length >= 1 && max_length <= 16 && fast_bits >= 1 && chunk % 2 == 0, "args");
    Chunks c = chunks_of(stream, offsets, chunk, total);
    int status = check_offsets(c);
    if (status) return (int64_t)status * 1000000;
    PairTables t = pair_tables(symbols.data_ptr<uint8_t>(), symbols.numel(),
                               lengths.data_ptr<uint8_t>(), (int)max_length, (int)fast_bits);
    const uint8_t* sm = raw.data_ptr<uint8_t>();
    uint16_t* dst = (uint16_t*)out.data_ptr<int16_t>();
    int64_t groups = (c.n_chunks + kLanes - 1) / kLanes;
    std::vector<int64_t> statuses(groups, 0);
    // a helper thread costs about as much as decoding one group: give each at least two
    parallel_for(groups, std::min<int64_t>(threads, (groups + 1) / 2), [&](int64_t g) {
        statuses[g] = pair_group(c, t, sm, dst, g * kLanes);
    });
    for (int64_t st : statuses)
        if (st) return st;
    return 0;
}

// The first-level tables of decode_bf16_pairs (single as int32, fast as int64) and every
// `stride`-th pair decoded from a 2**L-entry window index, for tests against the reference.
std::vector<torch::Tensor> pair_decode_tables(torch::Tensor symbols, torch::Tensor lengths,
                                              int64_t max_length, int64_t fast_bits) {
    PairTables t = pair_tables(symbols.data_ptr<uint8_t>(), symbols.numel(),
                               lengths.data_ptr<uint8_t>(), (int)max_length, (int)fast_bits);
    auto single = torch::empty({(int64_t)t.single.size()}, torch::kInt32);
    auto fast = torch::empty({(int64_t)t.fast.size()}, torch::kInt64);
    std::memcpy(single.data_ptr<int32_t>(), t.single.data(), 4 * t.single.size());
    std::memcpy(fast.data_ptr<int64_t>(), t.fast.data(), 8 * t.fast.size());
    auto full = torch::empty({(int64_t)1 << max_length}, torch::kInt32);
    int32_t* f = full.data_ptr<int32_t>();
    for (int64_t i = 0; i < ((int64_t)1 << max_length); ++i)
        f[i] = (int32_t)decode_pair(t, (uint64_t)i << (64 - max_length));
    return {single, fast, full};
}

// Histogram of uint8 or int32 symbols in [0, alphabet) (int64 counts).
torch::Tensor histogram(torch::Tensor symbols, int64_t alphabet) {
    auto out = torch::zeros({alphabet}, torch::kInt64);
    int64_t* h = out.data_ptr<int64_t>();
    int64_t n = symbols.numel();
    if (symbols.dtype() == torch::kInt32) {
        const int32_t* s = symbols.data_ptr<int32_t>();
        for (int64_t i = 0; i < n; ++i)
            if (s[i] >= 0 && s[i] < alphabet) h[s[i]]++;  // the caller checks the total
    } else {
        const uint8_t* s = symbols.data_ptr<uint8_t>();
        int64_t part[4][256] = {};  // four partial histograms break the store-to-load chain
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
            part[0][s[i]]++;
            part[1][s[i + 1]]++;
            part[2][s[i + 2]]++;
            part[3][s[i + 3]]++;
        }
        for (; i < n; ++i) part[0][s[i]]++;
        for (int k = 0; k < 256 && k < alphabet; ++k)  // symbols >= alphabet are dropped
            h[k] = part[0][k] + part[1][k] + part[2][k] + part[3][k];
    }
    return out;
}

// Exponent bytes -> int32 pair indices dense[e0] * A + dense[e1] (an odd tail pairs with 0).
torch::Tensor exponent_pairs(torch::Tensor exponents, torch::Tensor dense, int64_t alphabet) {
    const uint8_t* e = exponents.data_ptr<uint8_t>();
    const int32_t* d = dense.data_ptr<int32_t>();
    int64_t n = exponents.numel(), m = (n + 1) / 2;
    auto out = torch::empty({m}, torch::kInt32);
    int32_t* p = out.data_ptr<int32_t>();
    for (int64_t k = 0; k < n / 2; ++k) p[k] = d[e[2 * k]] * (int32_t)alphabet + d[e[2 * k + 1]];
    if (n % 2) p[m - 1] = d[e[n - 1]] * (int32_t)alphabet;
    return out;
}

// BF16 bit patterns -> (exponent bytes, sign+mantissa bytes).
void split_bf16(torch::Tensor values, torch::Tensor exponents, torch::Tensor raw,
                int64_t threads) {
    const uint16_t* v = (const uint16_t*)values.data_ptr<int16_t>();
    uint8_t* e = exponents.data_ptr<uint8_t>();
    uint8_t* r = raw.data_ptr<uint8_t>();
    int64_t n = values.numel();
    const int64_t block = 1 << 16;
    parallel_for((n + block - 1) / block, threads, [&](int64_t b) {
        int64_t stop = std::min(n, (b + 1) * block);
        for (int64_t i = b * block; i < stop; ++i) {
            uint16_t x = v[i];
            e[i] = (uint8_t)((x >> 7) & 0xFF);
            r[i] = (uint8_t)(((x >> 8) & 0x80) | (x & 0x7F));
        }
    });
}
