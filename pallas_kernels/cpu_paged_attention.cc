// Ragged paged attention for the CPU, as an XLA FFI custom call (one call per layer).
//
// The contract is ragged_paged_attention.py's: q [T, H, D] (float32 here), the stacked cache
// k/v [L, N, B, KVH, D] (float32, bfloat16 or float16), the layer, query_start_loc [R + 1],
// seq_lens [R] and block_tables [R, MB]; out [T, H, D] float32, zeros for padding tokens.
//
// Why a native kernel: XLA on the CPU gathers the blocks a step needs into a new array
// (~10 GB/s), then reads that array again in reductions that run far below the matmul
// rate. Here each block is read once, straight from the cache through the block table, by
// a tile of up to kTile query tokens of one request (all its heads), with an online
// softmax that takes up to kChunkKeys keys per update, so the cache traffic is one pass over
// the blocks each tile can see.
//
// Work items are tiles of a request's query tokens, all heads; the calling thread and
// helpers on XLA's intra-op thread pool take them from one atomic counter.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;  // query tokens of one request sharing each block load
constexpr int64_t kChunkKeys = 256;  // keys a softmax update takes at once (whole blocks)
// Below any finite score: the kernel is built with -ffast-math (vectorized exp), which
// assumes no infinities, so none is used as a starting maximum.
constexpr float kLowest = -std::numeric_limits<float>::max();

inline float Bf16ToFloat(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct BFloat16 {
  uint16_t bits;
};

template <typename T>
inline float ToFloat(T x) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return Bf16ToFloat(x.bits);
  } else {
    return static_cast<float>(x);  // float, _Float16
  }
}

// A cache block [B, KVH, D] as float32: in place for a float32 cache, else converted into
// `scratch`.
template <typename T>
const float* BlockAsFloat(const T* src, int64_t count, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t e = 0; e < count; ++e) scratch[e] = ToFloat(src[e]);
    return scratch;
  }
}

// Asks for the next block's cache lines while the current one is worked on: blocks sit
// anywhere in the cache, so the hardware prefetcher cannot guess the next one. The lines are
// asked for a few at a time between rows of work; asking for a whole block at once stalls
// on the core's queue of outstanding misses.
class BlockPrefetcher {
 public:
  // `start` null: nothing to prefetch.
  BlockPrefetcher(const void* start, int64_t bytes, int64_t rounds)
      : start_(static_cast<const char*>(start)),
        bytes_(start ? bytes : 0),
        step_(((bytes + 63) / 64 + rounds - 1) / std::max<int64_t>(rounds, 1) * 64) {}

  // One round's share of the lines.
  void Round() {
    const int64_t end = std::min(offset_ + step_, bytes_);
    for (; offset_ < end; offset_ += 64) __builtin_prefetch(start_ + offset_, 0, 1);
  }

 private:
  const char* start_;
  int64_t bytes_, step_, offset_ = 0;
};

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  const int32_t* query_start_loc;
  const int32_t* seq_lens;
  const int32_t* block_tables;
  float* out;
  int64_t layer, num_tokens, num_heads, kv_heads, head_dim, num_blocks, block_size;
  int64_t num_reqs, table_width;
  float scale, soft_cap;  // soft_cap 0: none
  int64_t sliding_window;  // 0: none
};

// Per-thread scratch: the tile's scaled queries, softmax state and the current K/V block.
struct Scratch {
  std::vector<float> q, acc, m, l;
  std::vector<float> block;  // a K or V block converted from 16-bit floats (one pass at a time)
  std::vector<float> s, chunk_max;  // a chunk's scores, then weights; their row maxima
  int64_t chunk_keys = 0;           // keys in a chunk: whole blocks
  void Resize(const Problem& p) {
    int64_t rows = kTile * p.num_heads;
    q.resize(rows * p.head_dim);
    acc.resize(rows * p.head_dim);
    m.resize(rows);
    l.resize(rows);
    block.resize(p.block_size * p.kv_heads * p.head_dim);
    chunk_keys = std::max<int64_t>(1, kChunkKeys / p.block_size) * p.block_size;
    s.resize(rows * chunk_keys);
    chunk_max.resize(rows);
  }
};

// Eight floats as one vector (an AVX register on x86; the compiler splits it elsewhere).
typedef float Float8 __attribute__((vector_size(32)));
typedef float UnalignedFloat8 __attribute__((vector_size(32), aligned(4), may_alias));

inline Float8 Load8(const float* p) { return *reinterpret_cast<const UnalignedFloat8*>(p); }

// The lane sums of eight vectors, as one vector: out[i] = sum(v[i]).
inline Float8 LaneSums(const Float8 (&v)[8]) {
#ifdef __AVX__
  __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  Float8 out;
  for (int i = 0; i < 8; ++i) {
    float sum = 0.0f;
    for (int lane = 0; lane < 8; ++lane) sum += v[i][lane];
    out[i] = sum;
  }
  return out;
#endif
}

// scores[j] = q . keys[j * stride], j in [0, n), for a head dimension kD (a multiple of 8).
// Eight keys at a time: a dot product is a chain of dependent multiply-adds, and one chain
// per key keeps the FPU waiting on each add; eight interleaved chains keep it busy, and
// their lane sums come out together.
template <int64_t kD>
inline void KeyDots(const float* q, const float* keys, int64_t stride, int64_t n,
                    float* scores) {
  static_assert(kD % 8 == 0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Float8 acc[8] = {};
    for (int64_t c = 0; c < kD; c += 8) {
      const Float8 qc = Load8(q + c);
      for (int kk = 0; kk < 8; ++kk) acc[kk] += qc * Load8(keys + (j + kk) * stride + c);
    }
    const Float8 sums = LaneSums(acc);
    std::memcpy(scores + j, &sums, sizeof(sums));
  }
  for (; j < n; ++j) {
    Float8 a0 = {}, a1 = {};  // two chains
    for (int64_t c = 0; c < kD; c += 16) {
      a0 += Load8(q + c) * Load8(keys + j * stride + c);
      if (c + 8 < kD) a1 += Load8(q + c + 8) * Load8(keys + j * stride + c + 8);
    }
    const Float8 a = a0 + a1;
    float dot = 0.0f;
    for (int lane = 0; lane < 8; ++lane) dot += a[lane];
    scores[j] = dot;
  }
}

// scores[j] = q . keys[j * stride], j in [0, n): the fixed-size form where the head
// dimension has one (kD > 0, a multiple of 8), else a loop over `d`.
template <int64_t kD>
inline void ScoreKeys(const float* q, const float* keys, int64_t stride, int64_t n,
                      float* scores, int64_t d) {
  if constexpr (kD > 0) {
    KeyDots<kD>(q, keys, stride, n, scores);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = keys + j * stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < d; ++e) dot += q[e] * kr[e];
      scores[j] = dot;
    }
  }
}

// acc += sum_j weights[j] * values[j * stride], j in [0, n). With a fixed head dimension
// the accumulator stays in registers across the keys.
template <int64_t kD>
inline void AddWeightedValues(const float* weights, const float* values, int64_t stride,
                              int64_t n, float* acc, int64_t d) {
  if constexpr (kD > 0) {
    float a[kD];
#pragma omp simd
    for (int64_t e = 0; e < kD; ++e) a[e] = acc[e];
    for (int64_t j = 0; j < n; ++j) {
      const float weight = weights[j];
      const float* vr = values + j * stride;
#pragma omp simd
      for (int64_t e = 0; e < kD; ++e) a[e] += weight * vr[e];
    }
#pragma omp simd
    for (int64_t e = 0; e < kD; ++e) acc[e] = a[e];
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float weight = weights[j];
      const float* vr = values + j * stride;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) acc[e] += weight * vr[e];
    }
  }
}

// Attention of tokens [first, first + count) of request r (their positions start at
// `first_pos`), all heads. Rows of the softmax state are (token, head) pairs.
//
// Keys are taken a chunk of blocks at a time, in two passes: the first scores every row
// against the chunk's keys, then each row's softmax state takes the chunk in one update
// (max, exponentials, sum: vector loops over up to kChunkKeys scores), and the second pass
// adds the weighted values. Updating per block instead costs those steps every 16 keys.
template <typename T, int64_t kD>
void AttendTile(const Problem& p, Scratch& w, int64_t r, int64_t first, int64_t count,
                int64_t first_pos) {
  const int64_t d = kD > 0 ? kD : p.head_dim, heads = p.num_heads;
  const int64_t group = heads / p.kv_heads, bs = p.block_size, rows = count * heads;
  for (int64_t row = 0; row < rows; ++row) {
    const float* src = p.q + (first * heads + row) * d;
    float* dst = w.q.data() + row * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * p.scale;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + rows, 0.0f);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);

  const int64_t last_pos = first_pos + count - 1;
  // the first key position token i sees
  auto lowest_seen = [&](int64_t pos) -> int64_t {
    return p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
  };
  const int64_t slot_stride = p.kv_heads * d, block_elems = bs * slot_stride;
  const T* k_cache = static_cast<const T*>(p.k);
  const T* v_cache = static_cast<const T*>(p.v);
  const int32_t* table = p.block_tables + r * p.table_width;
  const int64_t layer_base = p.layer * p.num_blocks;
  const int64_t last_block = std::min(last_pos / bs, p.table_width - 1);
  auto block_id = [&](int64_t j) -> int64_t {  // -1 for an id past the cache
    const int64_t block = table[j];
    return block >= 0 && block < p.num_blocks ? block : -1;  // the engine never sends one
  };
  // Prefetches block `next` (-1: none) of `cache` over `rows` rounds.
  auto prefetcher = [&](int64_t next, const T* cache) {
    return BlockPrefetcher(next >= 0 ? cache + (layer_base + next) * block_elems : nullptr,
                           block_elems * sizeof(T), rows);
  };
  // Calls fn(row, lo, hi, slots) for each row of the tile that sees keys of block j (index
  // `block` in `cache`): its visible slots are lo..hi, and `slots` points at the row's KV
  // head in the block, read as float32 (through `convert` for a 16-bit cache). One
  // prefetch round per row.
  auto for_rows_seeing = [&](int64_t j, int64_t block, const T* cache, float* convert,
                             BlockPrefetcher& prefetch, auto&& fn) {
    const int64_t block_start = j * bs;
    const int64_t slots = std::min<int64_t>(bs, last_pos - block_start + 1);
    const float* data = BlockAsFloat(cache + (layer_base + block) * block_elems,
                                     slots * slot_stride, convert);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t pos = first_pos + i;
      const int64_t lo = std::max<int64_t>(0, lowest_seen(pos) - block_start);
      const int64_t hi = std::min(slots - 1, pos - block_start);
      for (int64_t head = 0; head < heads; ++head) {
        prefetch.Round();
        if (lo <= hi) fn(i * heads + head, lo, hi, data + (head / group) * d);
      }
    }
  };
  const int64_t chunk_blocks = w.chunk_keys / bs;
  float* scores = w.s.data();  // [rows, chunk_keys]: row-major, a row's keys in order
  float* chunk_max = w.chunk_max.data();

  for (int64_t cb = lowest_seen(first_pos) / bs; cb <= last_block; cb += chunk_blocks) {
    const int64_t ce = std::min(cb + chunk_blocks - 1, last_block), chunk_start = cb * bs;
    std::fill(chunk_max, chunk_max + rows, kLowest);
    // Pass 1: scores. A block outside the cache scores its keys far below any real one
    // (half the lowest float: subtracting a row's maximum from it stays finite).
    for (int64_t j = cb; j <= ce; ++j) {
      const int64_t block = block_id(j), column = (j - cb) * bs;
      // prefetch the next block's keys, or the chunk's first values for pass 2
      BlockPrefetcher prefetch = j < ce ? prefetcher(block_id(j + 1), k_cache)
                                        : prefetcher(block_id(cb), v_cache);
      if (block < 0) {
        for (int64_t row = 0; row < rows; ++row) {
          std::fill(scores + row * w.chunk_keys + column,
                    scores + row * w.chunk_keys + column + bs, kLowest / 2);
        }
        continue;
      }
      for_rows_seeing(j, block, k_cache, w.block.data(), prefetch,
                      [&](int64_t row, int64_t lo, int64_t hi, const float* keys) {
        float* out = scores + row * w.chunk_keys + column + lo;
        ScoreKeys<kD>(w.q.data() + row * d, keys + lo * slot_stride, slot_stride, hi - lo + 1,
                      out, d);
        float block_max = chunk_max[row];
        for (int64_t jj = 0; jj <= hi - lo; ++jj) {
          if (p.soft_cap > 0.0f) out[jj] = p.soft_cap * std::tanh(out[jj] / p.soft_cap);
          block_max = std::max(block_max, out[jj]);
        }
        chunk_max[row] = block_max;
      });
    }
    // Softmax: each row's running max, sum and accumulator take the chunk's keys.
    const int64_t chunk_end = std::min((ce + 1) * bs, last_pos + 1);  // past its last key
    for (int64_t i = 0; i < count; ++i) {
      const int64_t pos = first_pos + i;
      const int64_t a = std::max(lowest_seen(pos), chunk_start) - chunk_start;
      const int64_t b = std::min(pos + 1, chunk_end) - chunk_start;  // [a, b)
      for (int64_t head = 0; head < heads; ++head) {
        const int64_t row = i * heads + head;
        if (a >= b || !(chunk_max[row] > kLowest)) continue;  // no key of the cache
        float* sr = scores + row * w.chunk_keys;
        const bool seen = w.l[row] > 0.0f;  // keys of an earlier chunk
        const float new_max = seen ? std::max(w.m[row], chunk_max[row]) : chunk_max[row];
        const float correction = seen ? std::exp(w.m[row] - new_max) : 0.0f;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t jj = a; jj < b; ++jj) {
          sr[jj] = std::exp(sr[jj] - new_max);
          sum += sr[jj];
        }
        w.l[row] = w.l[row] * correction + sum;
        w.m[row] = new_max;
        float* acc = w.acc.data() + row * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) acc[e] *= correction;
      }
    }
    // Pass 2: the weighted values.
    for (int64_t j = cb; j <= ce; ++j) {
      const int64_t block = block_id(j), column = (j - cb) * bs;
      // prefetch the next block's values, or the next chunk's first keys
      BlockPrefetcher prefetch =
          j < ce ? prefetcher(block_id(j + 1), v_cache)
                 : prefetcher(ce < last_block ? block_id(ce + 1) : -1, k_cache);
      if (block < 0) continue;
      for_rows_seeing(j, block, v_cache, w.block.data(), prefetch,
                      [&](int64_t row, int64_t lo, int64_t hi, const float* values) {
        AddWeightedValues<kD>(scores + row * w.chunk_keys + column + lo,
                              values + lo * slot_stride, slot_stride, hi - lo + 1,
                              w.acc.data() + row * d, d);
      });
    }
  }

  for (int64_t row = 0; row < rows; ++row) {
    float* dst = p.out + (first * heads + row) * d;
    const float inv = w.l[row] > 0.0f ? 1.0f / w.l[row] : 0.0f;
    const float* acc = w.acc.data() + row * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) dst[e] = acc[e] * inv;
  }
}

// Query tokens at the front of a request that sit before position 0 (a seq_len shorter
// than q_len): they see no key, and stay zeros.
inline int64_t HiddenTokens(int64_t q_len, int64_t seq_len) {
  return std::max<int64_t>(0, q_len - seq_len);
}

// Shared by the threads of one call; held by pointer so that a helper the pool starts
// late (after the call returned) finds the counter exhausted and touches nothing else.
struct WorkQueue {
  explicit WorkQueue(int64_t total) : total(total) {}
  const int64_t total;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename T>
void RunItems(const Problem& p, const std::vector<int64_t>& tile_ends, WorkQueue& queue) {
  // Nothing but the queue is touched before an item is claimed: `p` and `tile_ends` live
  // only as long as the call waits for its items.
  Scratch scratch;
  bool sized = false;
  for (int64_t item = queue.next.fetch_add(1); item < queue.total;
       item = queue.next.fetch_add(1)) {
    if (!sized) {
      scratch.Resize(p);
      sized = true;
    }
    const int64_t tile = item;
    const int64_t r = std::upper_bound(tile_ends.begin(), tile_ends.end(), tile) -
                      tile_ends.begin();
    const int64_t tile_in_req = tile - (r ? tile_ends[r - 1] : 0);
    const int64_t start = p.query_start_loc[r];
    const int64_t q_len = p.query_start_loc[r + 1] - start;
    const int64_t first = start + HiddenTokens(q_len, p.seq_lens[r]) + tile_in_req * kTile;
    const int64_t count = std::min<int64_t>(kTile, start + q_len - first);
    const int64_t first_pos = p.seq_lens[r] - q_len + (first - start);  // >= 0
    if (p.head_dim == 64) {
      AttendTile<T, 64>(p, scratch, r, first, count, first_pos);
    } else if (p.head_dim == 128) {
      AttendTile<T, 128>(p, scratch, r, first, count, first_pos);
    } else {
      AttendTile<T, 0>(p, scratch, r, first, count, first_pos);
    }
    queue.done.fetch_add(1);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                          ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> layer,
                          ffi::Buffer<ffi::S32> query_start_loc, ffi::Buffer<ffi::S32> seq_lens,
                          ffi::Buffer<ffi::S32> block_tables, ffi::ResultBuffer<ffi::F32> out,
                          float scale, int64_t sliding_window, float soft_cap) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  auto td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged attention: q must be [T, H, D], the caches "
                                       "[L, N, B, KVH, D] and block_tables [R, MB]");
  }
  if (k_cache.element_type() != v_cache.element_type() ||
      !std::equal(kd.begin(), kd.end(), v_cache.dimensions().begin(),
                  v_cache.dimensions().end())) {
    return ffi::Error::InvalidArgument("paged attention: k and v caches differ in dtype or shape");
  }
  const ffi::DataType dtype = k_cache.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 &&
      dtype != ffi::DataType::F16) {
    return ffi::Error::InvalidArgument(
        "paged attention: the cache must be float32, bfloat16 or float16");
  }
  if (qd[1] < 1 || qd[2] < 1 || kd[2] < 1 || kd[3] < 1) {
    return ffi::Error::InvalidArgument("paged attention: empty heads, head dim or blocks");
  }
  Problem p;
  p.q = q.typed_data();
  p.k = k_cache.untyped_data();
  p.v = v_cache.untyped_data();
  p.query_start_loc = query_start_loc.typed_data();
  p.seq_lens = seq_lens.typed_data();
  p.block_tables = block_tables.typed_data();
  p.out = out->typed_data();
  p.num_tokens = qd[0];
  p.num_heads = qd[1];
  p.head_dim = qd[2];
  p.num_blocks = kd[1];
  p.block_size = kd[2];
  p.kv_heads = kd[3];
  p.num_reqs = td[0];
  p.table_width = td[1];
  p.layer = layer.typed_data()[0];
  p.scale = scale;
  p.soft_cap = soft_cap;
  p.sliding_window = sliding_window;
  if (kd[4] != p.head_dim || p.num_heads % p.kv_heads != 0 || p.layer < 0 ||
      p.layer >= kd[0] || seq_lens.dimensions()[0] != p.num_reqs ||
      query_start_loc.dimensions()[0] != p.num_reqs + 1) {
    return ffi::Error::InvalidArgument("paged attention: inconsistent shapes or layer");
  }
  std::memset(p.out, 0, sizeof(float) * p.num_tokens * p.num_heads * p.head_dim);

  // tile_ends[r]: tiles of requests 0..r (requests with no tokens or no context have none)
  std::vector<int64_t> tile_ends(p.num_reqs);
  int64_t tiles = 0;
  for (int64_t r = 0; r < p.num_reqs; ++r) {
    int64_t start = p.query_start_loc[r], q_len = p.query_start_loc[r + 1] - start;
    bool ok = q_len > 0 && start >= 0 && start + q_len <= p.num_tokens && p.seq_lens[r] > 0;
    if (ok) tiles += (q_len - HiddenTokens(q_len, p.seq_lens[r]) + kTile - 1) / kTile;
    tile_ends[r] = tiles;
  }
  const int64_t total = tiles;
  auto queue = std::make_shared<WorkQueue>(total);
  const Problem* problem = &p;
  const std::vector<int64_t>* ends = &tile_ends;
  auto run = [problem, ends, dtype](WorkQueue& q) {
    if (dtype == ffi::DataType::BF16) {
      RunItems<BFloat16>(*problem, *ends, q);
    } else if (dtype == ffi::DataType::F16) {
      RunItems<_Float16>(*problem, *ends, q);
    } else {
      RunItems<float>(*problem, *ends, q);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads() - 1, 0),
                                            total - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    // The helper holds the queue; it runs items only while the counter has some left,
    // and then only while this call is waiting for them to finish.
    pool.Schedule([queue, run]() { run(*queue); });
  }
  run(*queue);
  while (queue->done.load() < total) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxvllmPagedAttentionCpu, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k_cache
                                  .Arg<ffi::AnyBuffer>()         // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_start_loc
                                  .Arg<ffi::Buffer<ffi::S32>>()  // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
