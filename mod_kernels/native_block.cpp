// A whole deployed MoD block on the CPU in one call: pool -> router -> stable top-k -> gather ->
// folded f_k -> scale -> fuse. Built at first use by mod_kernels/native_block.py (which documents
// the method, the layout rules and the measurements behind this implementation).
//
// Three parallel phases over work items whose split depends on the shape only, never on the
// thread count, and every output element is computed by the same sequence of fp32 operations
// whichever thread runs its item: results are bitwise independent of the thread count and of the
// batch a sample comes in.
//   1. items (sample, channel chunk): spatial sums of the chunk's channels, the router's first
//      layer applied to the chunk's means (a partial hidden vector per item), the copy of the
//      chunk into a new output tensor, and the snapshot of the in-place targets;
//   2. items (channel chunk): partial hidden vectors summed in chunk order, ReLU, the router's
//      second layer and the sigmoid for every sample;
//   3. items (sample, tile of rows): stable top-k of the sample's scores, gather of the selected
//      channels on the tile plus the halo its 3x3 convolutions need, the folded reduced block in
//      fp32, scale by the selected score, add into the targets, the block's activation, store.
// Phase 3 reads a selected channel that is also an in-place target from the snapshot, so no item
// reads what another writes.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace {

using at::Tensor;

enum Kind : int64_t { kBottleneck = 0, kBasic = 1, kInverted = 2 };

constexpr int kLanes = 16;  // independent partial sums of a reduction (vectorised, in a fixed order)
constexpr int64_t kPoolItemElements = 1 << 15;  // elements pooled per phase-1 item (at least)
constexpr int64_t kChannelsLastRun = 64;  // channels per phase-1 item of a channels_last input (at least)
constexpr int64_t kTilePositions = 1024;  // output positions per phase-3 item (at least one row)
constexpr int64_t kParallelWork = 1 << 14;  // below this many elements a phase runs on one thread

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// The kLanes partial sums added in a fixed tree (unrolled, so that it stays in vector registers).
static_assert(kLanes == 16, "combine() adds 16 partial sums");
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float combine(float* acc) {
#pragma GCC unroll 8
  for (int l = 0; l < 8; ++l) acc[l] += acc[l + 8];
#pragma GCC unroll 4
  for (int l = 0; l < 4; ++l) acc[l] += acc[l + 4];
#pragma GCC unroll 2
  for (int l = 0; l < 2; ++l) acc[l] += acc[l + 2];
  return acc[0] + acc[1];
}

// sum_i a[i] (fp32), element i into partial sum i % kLanes.
template <typename T>
inline float sum_run(const T* a, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += to_f(a[i + l]);
  for (int l = 0; i + l < n; ++l) acc[l] += to_f(a[i + l]);
  return combine(acc);
}

// sum_run of four runs at once (independent chains, the same order as four sum_run calls).
template <typename T>
inline void sum_runs4(const T* a0, const T* a1, const T* a2, const T* a3, int64_t n, float* sums) {
  float acc0[kLanes] = {0}, acc1[kLanes] = {0}, acc2[kLanes] = {0}, acc3[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      acc0[l] += to_f(a0[i + l]);
      acc1[l] += to_f(a1[i + l]);
      acc2[l] += to_f(a2[i + l]);
      acc3[l] += to_f(a3[i + l]);
    }
  for (int l = 0; i + l < n; ++l) {
    acc0[l] += to_f(a0[i + l]);
    acc1[l] += to_f(a1[i + l]);
    acc2[l] += to_f(a2[i + l]);
    acc3[l] += to_f(a3[i + l]);
  }
  sums[0] = combine(acc0);
  sums[1] = combine(acc1);
  sums[2] = combine(acc2);
  sums[3] = combine(acc3);
}

// sum_i a[i] b[i] (fp32), product i into partial sum i % kLanes.
template <typename A>
inline float dot(const A* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += to_f(a[i + l]) * b[i + l];
  for (int l = 0; i + l < n; ++l) acc[l] += to_f(a[i + l]) * b[i + l];
  return combine(acc);
}

inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }
inline float relu6_keep_nan(float v) { return v < 0.f ? 0.f : (v > 6.f ? 6.f : v); }

// The low half of a channel's key: larger for lower channels, so that ties go to the lower
// channel. Its own inverse (it also turns a key's low half back into the channel).
inline int64_t tie_rank(int64_t channel, int64_t channels) { return channels - 1 - channel; }

// Distinct 64-bit keys whose descending order is the stable descending order of the scores:
// higher score first, ties to the lower channel, every NaN above every number (-0.0 ties 0.0).
inline int64_t score_key(float score, int64_t channel, int64_t channels) {
  int32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  int32_t ordered = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  if (score == 0.f) ordered = 0;
  if (score != score) ordered = 0x7FC00000;
  return (static_cast<int64_t>(ordered) << 32) | tie_rank(channel, channels);
}

// idx[0..k) = the k largest keys' channels in descending key order.
void top_k(const float* scores, int64_t channels, int64_t k, int64_t* idx, std::vector<int64_t>& keys) {
  if (k <= 64) {
    keys.assign(k, std::numeric_limits<int64_t>::min());
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t key = score_key(scores[c], c, channels);
      if (key <= keys[k - 1]) continue;
      int64_t j = k - 1;
      while (j > 0 && keys[j - 1] < key) {
        keys[j] = keys[j - 1];
        --j;
      }
      keys[j] = key;
    }
  } else {
    keys.resize(channels);
    for (int64_t c = 0; c < channels; ++c) keys[c] = score_key(scores[c], c, channels);
    std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<int64_t>());
  }
  for (int64_t j = 0; j < k; ++j) idx[j] = tie_rank(keys[j] & 0xFFFFFFFF, channels);
}

// Runs body(item) for item in [0, n) on torch's intra-op threads. Each item is one unit of work
// whose result does not depend on which thread runs it.
template <typename F>
void for_items(int64_t n, int64_t work_per_item, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
#ifdef INTRA_OP_PARALLEL
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
#else
  // No OpenMP in this build (e.g. Apple clang): the same contiguous split over torch's inter-op
  // pool, with as many workers as torch's intra-op thread count.
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  std::atomic<int64_t> pending(threads - 1);
  std::mutex mutex;
  std::condition_variable done;
  std::exception_ptr error;
  for (int64_t t = 1; t < threads; ++t) {
    at::launch([&, t] {
      try {
        for (int64_t i = t * chunk; i < std::min(n, (t + 1) * chunk); ++i) body(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
      }
      if (--pending == 0) {
        std::lock_guard<std::mutex> lock(mutex);
        done.notify_all();
      }
    });
  }
  for (int64_t i = 0; i < std::min(n, chunk); ++i) body(i);
  std::unique_lock<std::mutex> lock(mutex);
  done.wait(lock, [&] { return pending.load() == 0; });
  if (error) std::rethrow_exception(error);
#endif
}

struct Strides {
  int64_t b, c, h, w;
};

inline Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The reduced block's folded convolutions as fp32 arrays (a pointer into the tensor when it is
// already fp32 and contiguous, else a converted copy owned here).
struct FloatParam {
  const float* data = nullptr;
  std::vector<float> owned;
  void set(const Tensor& t, int64_t count) {
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
      data = t.data_ptr<float>();
      return;
    }
    Tensor converted = t.to(at::kFloat).contiguous();
    owned.assign(converted.data_ptr<float>(), converted.data_ptr<float>() + count);
    data = owned.data();
  }
  void zeros(int64_t count) {
    owned.assign(count, 0.f);
    data = owned.data();
  }
};

struct Problem {
  int64_t batch, channels, height, width, k, hidden, dilation, target_start;
  int kind;
  bool has_expand, relu, original, in_place, learned, copy_out;
  Strides xs, os;
  std::vector<FloatParam> weights, biases;
};

// ---------------------------------------------------------------------------------------------
// Reduced-block building blocks on fp32 planes. A tile's plane holds whole padded rows of one
// channel: `pitch` = W + 2 pad floats per row (pad = the 3x3 convolutions' dilation, zero columns
// on both sides), rows outside the image all zero, and `pad` guard floats before and after, so a
// 3x3 convolution is a one-dimensional stencil over the flattened rows: output element q reads
// q + (dy - 1) d pitch + (dx - 1) d. The outputs in the pad columns are meaningless; they are
// zeroed where a later 3x3 convolution reads them and skipped by the fusion.
// ---------------------------------------------------------------------------------------------

// out[o][q] = act(bias[o] + sum_i weight[o, i] in[i][q]) for q in [0, len), the sum in the order
// of i. Four inputs per pass over q keep the running sums in registers between them.
template <int Act>  // 0: none, 1: ReLU, 2: ReLU6
void conv1x1(const float* in, int64_t in_stride, int64_t n_in, float* out, int64_t out_stride, int64_t n_out,
             const float* weight, const float* bias, int64_t len) {
  for (int64_t o = 0; o < n_out; ++o) {
    float* dst = out + o * out_stride;
    const float* wo = weight + o * n_in;
    const float b = bias[o];
    for (int64_t q = 0; q < len; ++q) dst[q] = b;
    int64_t i = 0;
    for (; i + 4 <= n_in; i += 4) {
      const float w0 = wo[i], w1 = wo[i + 1], w2 = wo[i + 2], w3 = wo[i + 3];
      const float* s0 = in + i * in_stride;
      const float* s1 = s0 + in_stride;
      const float* s2 = s1 + in_stride;
      const float* s3 = s2 + in_stride;
      for (int64_t q = 0; q < len; ++q) {
        float v = dst[q];
        v += w0 * s0[q];
        v += w1 * s1[q];
        v += w2 * s2[q];
        v += w3 * s3[q];
        dst[q] = v;
      }
    }
    for (; i < n_in; ++i) {
      const float wv = wo[i];
      const float* src = in + i * in_stride;
      for (int64_t q = 0; q < len; ++q) dst[q] += wv * src[q];
    }
    if (Act == 1)
      for (int64_t q = 0; q < len; ++q) dst[q] = relu_keep_nan(dst[q]);
    if (Act == 2)
      for (int64_t q = 0; q < len; ++q) dst[q] = relu6_keep_nan(dst[q]);
  }
}

// acc[q] = bias + sum_{i, dy, dx} weight_o[i, dy, dx] in[i][q + (dy - 1) d pitch + (dx - 1) d], the sum
// in the order of (i, dy, dx); the nine taps of one input channel in one pass over q.
inline void conv3x3(const float* in, int64_t in_stride, int64_t n_in, const float* weight_o, float bias,
                    int64_t pitch, int64_t dilation, int64_t len, float* acc) {
  for (int64_t q = 0; q < len; ++q) acc[q] = bias;
  const int64_t row = dilation * pitch;
  for (int64_t i = 0; i < n_in; ++i) {
    const float* w = weight_o + i * 9;
    const float* c = in + i * in_stride;  // the centre tap
    const float* up = c - row;
    const float* down = c + row;
    const int64_t d = dilation;
    for (int64_t q = 0; q < len; ++q) {
      float v = acc[q];
      v += w[0] * up[q - d];
      v += w[1] * up[q];
      v += w[2] * up[q + d];
      v += w[3] * c[q - d];
      v += w[4] * c[q];
      v += w[5] * c[q + d];
      v += w[6] * down[q - d];
      v += w[7] * down[q];
      v += w[8] * down[q + d];
      acc[q] = v;
    }
  }
}

// Zeroes the pad columns of `rows` rows of every channel (the zero padding a 3x3 convolution reads).
inline void zero_pad_columns(float* plane, int64_t stride, int64_t channels, int64_t rows, int64_t pitch,
                             int64_t pad, int64_t width) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      float* row = plane + c * stride + r * pitch;
      for (int64_t x = 0; x < pad; ++x) row[x] = 0.f;
      for (int64_t x = pad + width; x < pitch; ++x) row[x] = 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 3: one (sample, tile) item.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct TileContext {
  const Problem& p;
  const T* x;
  T* out;
  const float* snapshot;  // [B, k, H * W] fp32 copy of the in-place targets, or null
  const int64_t* idx;     // [k] of this sample
  const float* w;         // [k] of this sample
  int64_t b;
};

// A tile's planes: `channels` planes of `rows` padded rows from image row `row0` on.
struct Planes {
  float* data;  // (channel c, plane row r, padded column x) at data[c * stride + r * pitch + x]
  int64_t stride, rows, row0;
};

inline int64_t planes_size(int64_t channels, int64_t rows, int64_t pitch, int64_t pad) {
  return channels * (rows * pitch + 2 * pad);
}

inline Planes make_planes(float*& cursor, int64_t channels, int64_t rows, int64_t row0, int64_t pitch,
                          int64_t pad) {
  Planes planes{cursor + pad, rows * pitch + 2 * pad, rows, row0};
  cursor += planes_size(channels, rows, pitch, pad);
  return planes;
}

// Copies the selected channels' image rows [r_begin, r_end) into `dst` (fp32, at column `pad`).
template <typename T>
void gather_rows(const TileContext<T>& t, int64_t r_begin, int64_t r_end, const Planes& dst, int64_t pitch,
                 int64_t pad) {
  const Problem& p = t.p;
  const int64_t lo = std::max<int64_t>(r_begin, 0), hi = std::min(r_end, p.height);
  const bool channels_last = p.xs.c == 1 && p.xs.w != 1;
  // channels_last: the channels not read from the snapshot are gathered position by position (the
  // k channels of a position share cache lines), not channel by channel at a stride of C.
  thread_local std::vector<int64_t> by_position;
  by_position.clear();
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t c = t.idx[j];
    float* base = dst.data + j * dst.stride + pad;
    const bool from_snapshot = t.snapshot && c >= p.target_start && c < p.target_start + p.k;
    if (channels_last && !from_snapshot) {
      by_position.push_back(j);
      continue;
    }
    for (int64_t r = lo; r < hi; ++r) {
      float* d = base + (r - dst.row0) * pitch;
      if (from_snapshot) {
        const float* s = t.snapshot + ((t.b * p.k + (c - p.target_start)) * p.height + r) * p.width;
        std::memcpy(d, s, p.width * sizeof(float));
      } else {
        const T* s = t.x + t.b * p.xs.b + c * p.xs.c + r * p.xs.h;
        if (p.xs.w == 1) {
          for (int64_t x = 0; x < p.width; ++x) d[x] = to_f(s[x]);
        } else {
          for (int64_t x = 0; x < p.width; ++x) d[x] = to_f(s[x * p.xs.w]);
        }
      }
    }
  }
  const int64_t n = static_cast<int64_t>(by_position.size());
  for (int64_t r = lo; r < hi; ++r) {
    const T* row = t.x + t.b * p.xs.b + r * p.xs.h;
    const int64_t offset = pad + (r - dst.row0) * pitch;
    for (int64_t x = 0; x < p.width; ++x) {
      const T* position = row + x * p.xs.w;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = by_position[i];
        dst.data[j * dst.stride + offset + x] = to_f(position[t.idx[j] * p.xs.c]);
      }
    }
  }
}

// out[b, target_j, r, :] = act(x[b, target_j, r, :] + w_j * y_row[:]).
template <typename T>
inline void fuse_row(const TileContext<T>& t, int64_t j, int64_t r, const float* y_row) {
  const Problem& p = t.p;
  const int64_t target = p.original ? t.idx[j] : p.target_start + j;
  const T* src = t.x + t.b * p.xs.b + target * p.xs.c + r * p.xs.h;
  T* dst = t.out + t.b * p.os.b + target * p.os.c + r * p.os.h;
  const float scale = t.w[j];
  if (p.xs.w == 1 && p.os.w == 1) {
    if (p.relu) {
      for (int64_t x = 0; x < p.width; ++x) dst[x] = static_cast<T>(relu_keep_nan(to_f(src[x]) + scale * y_row[x]));
    } else {
      for (int64_t x = 0; x < p.width; ++x) dst[x] = static_cast<T>(to_f(src[x]) + scale * y_row[x]);
    }
  } else {
    for (int64_t x = 0; x < p.width; ++x) {
      const float v = to_f(src[x * p.xs.w]) + scale * y_row[x];
      dst[x * p.os.w] = static_cast<T>(p.relu ? relu_keep_nan(v) : v);
    }
  }
}

// Scales and fuses the k output planes ys (slot j's at ys + j * len: the tile's rows, padded pitch)
// into their targets: plane by plane, row by row; channels_last outputs position by position (the
// k targets of a position share cache lines). The same arithmetic for every element either way.
template <typename T>
void fuse_tile(const TileContext<T>& t, const float* ys, int64_t len, int64_t r0, int64_t rows, int64_t pitch,
               int64_t pad) {
  const Problem& p = t.p;
  const bool channels_last = p.xs.c == 1 && p.xs.w != 1 && p.os.c == 1 && p.os.w != 1;
  if (!channels_last) {
    for (int64_t j = 0; j < p.k; ++j)
      for (int64_t r = 0; r < rows; ++r) fuse_row(t, j, r0 + r, ys + j * len + r * pitch + pad);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* src_row = t.x + t.b * p.xs.b + (r0 + r) * p.xs.h;
    T* dst_row = t.out + t.b * p.os.b + (r0 + r) * p.os.h;
    const float* y_row = ys + r * pitch + pad;
    for (int64_t x = 0; x < p.width; ++x) {
      const T* src = src_row + x * p.xs.w;
      T* dst = dst_row + x * p.os.w;
      for (int64_t j = 0; j < p.k; ++j) {
        const int64_t target = p.original ? t.idx[j] : p.target_start + j;
        const float v = to_f(src[target]) + t.w[j] * y_row[j * len + x];
        dst[target] = static_cast<T>(p.relu ? relu_keep_nan(v) : v);
      }
    }
  }
}

thread_local std::vector<float> tls_scratch;

inline float* scratch(int64_t count) {
  if (static_cast<int64_t>(tls_scratch.size()) < count) tls_scratch.resize(count);
  std::fill(tls_scratch.begin(), tls_scratch.begin() + count, 0.f);
  return tls_scratch.data();
}

template <typename T>
void bottleneck_tile(const TileContext<T>& t, int64_t r0, int64_t r1) {
  const Problem& p = t.p;
  const int64_t d = p.dilation, W = p.width, m = p.hidden, k = p.k;
  const int64_t rows = r1 - r0, pitch = W + 2 * d, len = rows * pitch;
  const int64_t lo = std::max<int64_t>(r0 - d, 0), hi = std::min(r1 + d, p.height);
  float* cursor = scratch(planes_size(k, rows + 2 * d, pitch, d) + planes_size(m, rows + 2 * d, pitch, d) +
                          m * len + k * len);
  const Planes xs = make_planes(cursor, k, rows + 2 * d, r0 - d, pitch, d);
  const Planes t1 = make_planes(cursor, m, rows + 2 * d, r0 - d, pitch, d);
  float* t2 = cursor;
  float* y = t2 + m * len;
  gather_rows(t, lo, hi, xs, pitch, d);
  // 1x1 k -> m, ReLU, on the image rows of the halo; then the pad columns back to zero.
  const int64_t first = (lo - xs.row0) * pitch;
  conv1x1<1>(xs.data + first, xs.stride, k, t1.data + first, t1.stride, m, p.weights[0].data, p.biases[0].data,
             (hi - lo) * pitch);
  zero_pad_columns(t1.data + first, t1.stride, m, hi - lo, pitch, d, W);
  // 3x3 m -> m (dilation d), ReLU, on the tile's rows.
  for (int64_t o = 0; o < m; ++o) {
    float* dst = t2 + o * len;
    conv3x3(t1.data + d * pitch, t1.stride, m, p.weights[1].data + o * m * 9, p.biases[1].data[o], pitch, d, len, dst);
    for (int64_t q = 0; q < len; ++q) dst[q] = relu_keep_nan(dst[q]);
  }
  // 1x1 m -> k, then scale and fuse.
  for (int64_t j = 0; j < k; ++j)
    conv1x1<0>(t2, len, m, y + j * len, len, 1, p.weights[2].data + j * m, p.biases[2].data + j, len);
  fuse_tile(t, y, len, r0, rows, pitch, d);
}

template <typename T>
void basic_tile(const TileContext<T>& t, int64_t r0, int64_t r1) {
  const Problem& p = t.p;
  const int64_t d = p.dilation, W = p.width, k = p.k;
  const int64_t rows = r1 - r0, pitch = W + 2 * d, len = rows * pitch;
  float* cursor = scratch(planes_size(k, rows + 4 * d, pitch, d) + planes_size(k, rows + 2 * d, pitch, d) + k * len);
  const Planes xs = make_planes(cursor, k, rows + 4 * d, r0 - 2 * d, pitch, d);
  const Planes t1 = make_planes(cursor, k, rows + 2 * d, r0 - d, pitch, d);
  float* y = cursor;
  gather_rows(t, r0 - 2 * d, r1 + 2 * d, xs, pitch, d);
  // 3x3 k -> k, ReLU, on the image rows of [r0 - d, r1 + d); then the pad columns back to zero.
  const int64_t lo = std::max<int64_t>(r0 - d, 0), hi = std::min(r1 + d, p.height);
  for (int64_t o = 0; o < k; ++o) {
    float* dst = t1.data + o * t1.stride + (lo - t1.row0) * pitch;
    conv3x3(xs.data + (lo - xs.row0) * pitch, xs.stride, k, p.weights[0].data + o * k * 9, p.biases[0].data[o],
            pitch, d, (hi - lo) * pitch, dst);
    for (int64_t q = 0; q < (hi - lo) * pitch; ++q) dst[q] = relu_keep_nan(dst[q]);
  }
  zero_pad_columns(t1.data + (lo - t1.row0) * pitch, t1.stride, k, hi - lo, pitch, d, W);
  // 3x3 k -> k, then scale and fuse.
  for (int64_t j = 0; j < k; ++j)
    conv3x3(t1.data + d * pitch, t1.stride, k, p.weights[1].data + j * k * 9, p.biases[1].data[j], pitch, d, len,
            y + j * len);
  fuse_tile(t, y, len, r0, rows, pitch, d);
}

template <typename T>
void inverted_tile(const TileContext<T>& t, int64_t r0, int64_t r1) {
  const Problem& p = t.p;
  const int64_t W = p.width, k = p.k, e = p.hidden;
  const int64_t rows = r1 - r0, pitch = W + 2, len = rows * pitch;
  const int64_t lo = std::max<int64_t>(r0 - 1, 0), hi = std::min(r1 + 1, p.height);
  float* cursor = scratch(planes_size(k, rows + 2, pitch, 1) + (p.has_expand ? planes_size(e, rows + 2, pitch, 1) : 0) +
                          e * len + k * len);
  const Planes xs = make_planes(cursor, k, rows + 2, r0 - 1, pitch, 1);
  gather_rows(t, lo, hi, xs, pitch, 1);
  Planes expanded = xs;
  int layer = 0;
  if (p.has_expand) {  // 1x1 k -> e, ReLU6; then the pad columns back to zero.
    expanded = make_planes(cursor, e, rows + 2, r0 - 1, pitch, 1);
    const int64_t first = (lo - xs.row0) * pitch;
    conv1x1<2>(xs.data + first, xs.stride, k, expanded.data + first, expanded.stride, e, p.weights[0].data,
               p.biases[0].data, (hi - lo) * pitch);
    zero_pad_columns(expanded.data + first, expanded.stride, e, hi - lo, pitch, 1, W);
    layer = 1;
  }
  float* dw = cursor;
  float* y = dw + e * len;
  // 3x3 depthwise, ReLU6, on the tile's rows.
  const float* w_dw = p.weights[layer].data;
  for (int64_t c = 0; c < e; ++c) {
    float* dst = dw + c * len;
    conv3x3(expanded.data + c * expanded.stride + pitch, 0, 1, w_dw + c * 9, p.biases[layer].data[c], pitch, 1, len,
            dst);
    for (int64_t q = 0; q < len; ++q) dst[q] = relu6_keep_nan(dst[q]);
  }
  // 1x1 e -> k, then scale and fuse.
  for (int64_t j = 0; j < k; ++j)
    conv1x1<0>(dw, len, e, y + j * len, len, 1, p.weights[layer + 1].data + j * e, p.biases[layer + 1].data + j,
               len);
  fuse_tile(t, y, len, r0, rows, pitch, 1);
}

// ---------------------------------------------------------------------------------------------
// Phase 1: spatial sums (and the copies) of one (sample, channel chunk) item.
// ---------------------------------------------------------------------------------------------

template <typename T>
void pool_chunk(const Problem& p, const T* x, T* out, float* snapshot, int64_t b, int64_t c0, int64_t c1,
                float* sums) {
  const int64_t H = p.height, W = p.width, HW = H * W;
  const Strides& s = p.xs;
  const Strides& o = p.os;
  const T* xb = x + b * s.b;
  T* ob = p.copy_out ? out + b * o.b : nullptr;
  const bool pool = p.learned;
  if (s.c == 1 && s.w != 1) {  // channels last: channels contiguous at each position
    const int64_t n = c1 - c0;
    float* __restrict acc = sums;
    for (int64_t c = 0; c < n; ++c) acc[c] = 0.f;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const T* __restrict src = xb + h * s.h + w * s.w + c0;
        if (pool)
          for (int64_t c = 0; c < n; ++c) acc[c] += to_f(src[c]);
        if (ob) {
          T* dst = ob + h * o.h + w * o.w + c0 * o.c;
          if (o.c == 1) {
            std::memcpy(dst, src, n * sizeof(T));
          } else {
            for (int64_t c = 0; c < n; ++c) dst[c * o.c] = src[c];
          }
        }
        if (snapshot) {
          for (int64_t c = std::max(c0, p.target_start); c < std::min(c1, p.target_start + p.k); ++c)
            snapshot[((b * p.k + c - p.target_start) * H + h) * W + w] = to_f(src[c - c0]);
        }
      }
    return;
  }
  const bool flat = s.w == 1 && (H == 1 || s.h == W);
  int64_t pooled_to = c0;  // flat planes: sums of four channels at a time, up to here
  if (pool && flat) {
    for (; pooled_to + 4 <= c1; pooled_to += 4) {
      const T* plane = xb + pooled_to * s.c;
      sum_runs4(plane, plane + s.c, plane + 2 * s.c, plane + 3 * s.c, HW, sums + (pooled_to - c0));
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    const T* plane = xb + c * s.c;
    T* out_plane = ob ? ob + c * o.c : nullptr;
    if (pool && c >= pooled_to) {
      if (flat) {
        sums[c - c0] = sum_run(plane, HW);
      } else {
        float acc[kLanes] = {0};
        for (int64_t h = 0; h < H; ++h) {
          const T* row = plane + h * s.h;
          int64_t w = 0;
          if (s.w == 1) {
            for (; w + kLanes <= W; w += kLanes)
              for (int l = 0; l < kLanes; ++l) acc[l] += to_f(row[w + l]);
            for (int l = 0; w + l < W; ++l) acc[l] += to_f(row[w + l]);
          } else {
            for (; w < W; ++w) acc[w % kLanes] += to_f(row[w * s.w]);
          }
        }
        sums[c - c0] = combine(acc);
      }
    }
    if (out_plane) {
      if (flat && o.w == 1 && (H == 1 || o.h == W)) {
        std::memcpy(out_plane, plane, HW * sizeof(T));
      } else {
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) out_plane[h * o.h + w * o.w] = plane[h * s.h + w * s.w];
      }
    }
    if (snapshot && c >= p.target_start && c < p.target_start + p.k) {
      float* dst = snapshot + (b * p.k + c - p.target_start) * HW;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) dst[h * W + w] = to_f(plane[h * s.h + w * s.w]);
    }
  }
}

template <typename T, typename R>
void run_block(Problem& p, const Tensor& x_t, const Tensor& out_t, const R* fc1, const R* fc2, int64_t c_hidden,
               float* scores, int64_t* idx, float* w) {
  const int64_t B = p.batch, C = p.channels, H = p.height, W = p.width, HW = H * W, k = p.k;
  const T* x = x_t.data_ptr<T>();
  T* out = out_t.data_ptr<T>();

  // Phase 1. A channels_last item reads a run of channels at every position: at least
  // kChannelsLastRun channels (whole vectors), else its reads would be short strided runs.
  const bool channels_last = p.xs.c == 1 && p.xs.w != 1;
  int64_t chunk = std::min(C, std::max<int64_t>(1, (kPoolItemElements + HW - 1) / HW));
  if (channels_last) chunk = std::min(C, std::max(chunk, kChannelsLastRun));
  const int64_t n_chunks = (C + chunk - 1) / chunk;
  std::vector<float> partial(p.learned ? B * n_chunks * c_hidden : 0);
  std::vector<float> snapshot(p.in_place ? B * k * HW : 0);
  float* snap = p.in_place ? snapshot.data() : nullptr;
  if (p.learned || p.copy_out || p.in_place) {
    for_items(B * n_chunks, chunk * HW, [&](int64_t item) {
      const int64_t b = item / n_chunks, q = item % n_chunks;
      const int64_t c0 = q * chunk, c1 = std::min(C, c0 + chunk);
      std::vector<float> sums(c1 - c0);
      pool_chunk(p, x, out, snap, b, c0, c1, sums.data());
      if (!p.learned) return;
      const float inv_hw = 1.f / static_cast<float>(HW);
      for (int64_t c = 0; c < c1 - c0; ++c) sums[c] *= inv_hw;
      float* dst = partial.data() + (b * n_chunks + q) * c_hidden;
      for (int64_t h = 0; h < c_hidden; ++h) dst[h] = dot(fc1 + h * C + c0, sums.data(), c1 - c0);
    });
  }

  // Phase 2.
  if (p.learned) {
    std::vector<float> hidden(B * c_hidden, 0.f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t q = 0; q < n_chunks; ++q)
        for (int64_t h = 0; h < c_hidden; ++h) hidden[b * c_hidden + h] += partial[(b * n_chunks + q) * c_hidden + h];
    for (auto& v : hidden) v = relu_keep_nan(v);
    const int64_t per_item = std::max<int64_t>(1, std::min(C, kPoolItemElements / std::max<int64_t>(1, c_hidden * B)));
    const int64_t n_items = (C + per_item - 1) / per_item;
    for_items(n_items, per_item * c_hidden * B, [&](int64_t item) {
      const int64_t c0 = item * per_item, c1 = std::min(C, c0 + per_item);
      for (int64_t b = 0; b < B; ++b) {
        float* row = scores + b * C;
        for (int64_t c = c0; c < c1; ++c) row[c] = dot(fc2 + c * c_hidden, hidden.data() + b * c_hidden, c_hidden);
        for (int64_t c = c0; c < c1; ++c) row[c] = 1.f / (1.f + std::exp(-row[c]));
      }
    });
  }

  // Phase 3.
  const int64_t tile_rows = std::min(H, std::max<int64_t>(1, (kTilePositions + W - 1) / W));
  const int64_t n_tiles = (H + tile_rows - 1) / tile_rows;
  int64_t work = k * tile_rows * W;
  for_items(B * n_tiles, work, [&](int64_t item) {
    const int64_t b = item / n_tiles, tile = item % n_tiles;
    thread_local std::vector<int64_t> keys;
    std::vector<int64_t> sel(k);
    std::vector<float> sel_w(k);
    top_k(scores + b * C, C, k, sel.data(), keys);
    for (int64_t j = 0; j < k; ++j) sel_w[j] = p.learned ? scores[b * C + sel[j]] : 1.f;
    if (tile == 0) {
      std::memcpy(idx + b * k, sel.data(), k * sizeof(int64_t));
      std::memcpy(w + b * k, sel_w.data(), k * sizeof(float));
    }
    TileContext<T> ctx{p, x, out, snap, sel.data(), sel_w.data(), b};
    const int64_t r0 = tile * tile_rows, r1 = std::min(H, r0 + tile_rows);
    if (p.kind == kBottleneck) {
      bottleneck_tile(ctx, r0, r1);
    } else if (p.kind == kBasic) {
      basic_tile(ctx, r0, r1);
    } else {
      inverted_tile(ctx, r0, r1);
    }
  });
}

// Returns (idx [B, k] int64, w [B, k] fp32, scores [B, C] fp32). `out` is `x` itself (in place:
// affine fusions only) or a new tensor of x's shape; `target_start` is -1 for "original" fusion.
std::vector<Tensor> native_block(const Tensor& x, const Tensor& out, int64_t kind, const std::vector<Tensor>& weights,
                                 const std::vector<c10::optional<Tensor>>& biases, int64_t k, int64_t hidden,
                                 int64_t dilation, int64_t target_start, bool relu, bool has_expand,
                                 const c10::optional<Tensor>& fc1, const c10::optional<Tensor>& fc2,
                                 const c10::optional<Tensor>& given_scores) {
  // The Python wrapper (mod_kernels/native_block.py) checks shapes and values; these guard the memory.
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "native_block: out must match x");
  TORCH_CHECK(k >= 1 && k <= x.size(1) && dilation >= 1 && hidden >= 1, "native_block: bad k, hidden or dilation");
  TORCH_CHECK(weights.size() == biases.size() && weights.size() >= 2 && weights.size() <= 3,
              "native_block: two or three convolutions");
  TORCH_CHECK(fc1.has_value() == fc2.has_value() && fc1.has_value() != given_scores.has_value(),
              "native_block: either fc1 and fc2, or scores");
  if (fc1.has_value()) {
    TORCH_CHECK(fc1->is_contiguous() && fc2->is_contiguous() && fc1->scalar_type() == fc2->scalar_type() &&
                    (fc1->scalar_type() == at::kFloat || fc1->scalar_type() == x.scalar_type()) &&
                    fc1->size(1) == x.size(1) && fc2->size(0) == x.size(1) && fc2->size(1) == fc1->size(0),
                "native_block: router weights must be contiguous [C_h, C] and [C, C_h], fp32 or x's dtype");
  } else {
    TORCH_CHECK(given_scores->is_contiguous() && given_scores->scalar_type() == at::kFloat &&
                    given_scores->size(0) == x.size(0) && given_scores->size(1) == x.size(1),
                "native_block: scores must be contiguous fp32 [B, C]");
  }
  Problem p;
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  p.k = k;
  p.hidden = hidden;
  p.dilation = dilation;
  p.kind = static_cast<int>(kind);
  p.has_expand = has_expand;
  p.relu = relu;
  p.original = target_start < 0;
  p.target_start = std::max<int64_t>(target_start, 0);
  p.in_place = out.is_same(x);
  p.copy_out = !p.in_place;
  p.learned = fc1.has_value();
  p.xs = strides_of(x);
  p.os = strides_of(out);
  p.weights.resize(weights.size());
  p.biases.resize(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    p.weights[i].set(weights[i], weights[i].numel());
    if (biases[i].has_value()) {
      p.biases[i].set(*biases[i], weights[i].size(0));
    } else {
      p.biases[i].zeros(weights[i].size(0));
    }
  }
  const auto float_options = x.options().dtype(at::kFloat);
  Tensor idx = at::empty({p.batch, k}, x.options().dtype(at::kLong));
  Tensor w = at::empty({p.batch, k}, float_options);
  Tensor scores = p.learned ? at::empty({p.batch, p.channels}, float_options) : *given_scores;
  const int64_t c_hidden = p.learned ? fc1->size(0) : 0;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    if (!p.learned || fc1->scalar_type() == at::kFloat) {
      const float* w1 = p.learned ? fc1->data_ptr<float>() : nullptr;
      const float* w2 = p.learned ? fc2->data_ptr<float>() : nullptr;
      run_block<T, float>(p, x, out, w1, w2, c_hidden, scores.data_ptr<float>(), idx.data_ptr<int64_t>(),
                          w.data_ptr<float>());
    } else {
      run_block<T, T>(p, x, out, fc1->data_ptr<T>(), fc2->data_ptr<T>(), c_hidden, scores.data_ptr<float>(),
                      idx.data_ptr<int64_t>(), w.data_ptr<float>());
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "native_block: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return {idx, w, scores};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("native_block", &native_block, "A deployed MoD block on the CPU (see mod_kernels/native_block.py)");
}
