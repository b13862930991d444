// Direct convolution kernels for XLA:CPU, called through XLA's FFI (see
// resnet_jax/cpu/native_conv.py, which builds this file and registers the handlers).
//
// Why: XLA:CPU's Eigen convolutions run ResNet's narrow layers (16 channels) and its
// weight gradients well below the machine's peak (benchmarks/RESULTS.md). These kernels keep a tile of outputs in vector registers and stream the input through
// them as broadcast multiply-adds, which is how the libraries PyTorch calls do it.
//
// Layouts are XLA's canonical ones: input NHWC, kernel HWIO, output NHWC, all float32
// and row-major. Padding is handled here (no padded copy of the input is made): taps that
// fall outside the input are skipped. Output channels must be a multiple of 16.
//
// The key fact used throughout: for a fixed kernel row kh, the taps (kw, c) of one output
// pixel read kw * C + c elements past the pixel's first input element, a contiguous run
// of KW * C floats. So a kernel row is a (KW * C) x O matrix, and a convolution row is a
// sum of KH matrix products whose left operand rows are overlapping runs of the input.
//
// Results are deterministic: every output element is summed in an order fixed by the
// shapes alone, whichever threads run which tiles.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// (Named, as commas inside template arguments would split the handler macros' arguments.)
using Image = ffi::Buffer<ffi::F32, 4>;
using ImageResult = ffi::ResultBuffer<ffi::F32, 4>;

// The target's vector registers, as the compiler's flags (-march) define them. Vectors
// wider than the registers would be split by the compiler and the tiles below spilled to
// memory: AVX-512's tile shapes built for AVX2 ran 10-100x slower (benchmarks/RESULTS.md).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16;
#else
constexpr int kLanes = 4, kRegisters = 16;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
// Output channels come in multiples of 16 (what the Python side routes here): whole
// vectors for every width above.
constexpr int64_t kChannelMultiple = 16;

// A register tile holds P x B accumulators (P pixels or kernel taps by B vectors of output
// channels), B vectors of the other operand and a broadcast: 3/4 of the registers for the
// accumulators leaves room for the rest with B up to 4 (24 on AVX-512, 12 on AVX2; the
// best of the budgets measured on both builds).
constexpr int kAccumulators = kRegisters * 3 / 4;
constexpr int MaxTilePixels(int b) { return kAccumulators / b; }

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Runs fn(0) .. fn(n - 1) on the calling thread and the intra-op pool's threads. Items are
// claimed from a shared counter, so the caller never waits on an item nobody has started
// (no deadlock when every pool thread is busy: the caller then runs all items itself).
// The caller then sleeps until the items others claimed are done: spinning would take a
// core from the very threads it waits for, and from XLA's, whenever threads outnumber cores.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t n, done = 0;  // done: guarded by mutex
    std::function<void(int64_t)> fn;
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = fn;
  auto work = [](State& s) {
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.n; ++finished) s.fn(i);
    if (finished == 0) return;
    std::lock_guard<std::mutex> lock(s.mutex);
    if ((s.done += finished) == s.n) s.all_done.notify_all();
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  // A helper that starts after all items are claimed finds nothing to do; the shared state
  // outlives this call for it.
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == n; });
}

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t kh, kw, o;      // kernel (kh, kw, c, o)
  int64_t ho, wo;         // output
  int64_t sh, sw, ph, pw; // strides and leading padding

  int64_t RowRun() const { return kw * c; }  // J: the contiguous run one kernel row reads
  // Output columns whose taps all fall inside the input: [first, last).
  std::pair<int64_t, int64_t> InteriorColumns() const {
    const int64_t first = std::min(wo, (pw + sw - 1) / sw);
    const int64_t reach = w + pw - kw;  // the last window start that fits, times sw
    const int64_t last = reach < 0 ? first : std::clamp(reach / sw + 1, first, wo);
    return {first, last};
  }
  // The kernel rows (columns) a window starting at input row (column) `start` may use.
  std::pair<int64_t, int64_t> Taps(int64_t start, int64_t k, int64_t size) const {
    return {std::max<int64_t>(0, -start), std::min(k, size - start)};
  }
  // Calls edge(x, j_lo, j_hi) for each output column outside InteriorColumns(), with the
  // part [j_lo, j_hi) of a kernel row's run whose taps fall inside the input (maybe none).
  template <typename Edge>
  void ForEachEdgeColumn(Edge&& edge) const {
    const auto [first, last] = InteriorColumns();
    for (int64_t x = 0; x < wo; ++x) {
      if (x == first) x = std::max(x, last);
      if (x >= wo) break;
      const auto [kw_lo, kw_hi] = Taps(x * sw - pw, kw, w);
      edge(x, kw_lo * c, std::max(kw_lo, kw_hi) * c);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Forward: out[n, y, x, o] = sum over taps of in[n, y*sh + i - ph, x*sw + j - pw, c] * k[i, j, c, o].

// P output pixels of one row by B * kLanes output channels. `in` points at the input element
// of the first pixel's window origin (row kh_lo is the first row read); runs [j_lo, j_hi)
// of each kernel row are read.
template <int P, int B>
void ForwardTile(const float* in, int64_t pixel_step, int64_t row_step, const float* kernel,
                 int64_t o, int64_t run, int64_t kh_lo, int64_t kh_hi, int64_t j_lo, int64_t j_hi,
                 float* out) {
  Vec acc[P][B] = {};
  for (int64_t i = kh_lo; i < kh_hi; ++i) {
    const float* in_row = in + i * row_step;
    const float* k_row = kernel + i * run * o;
    for (int64_t j = j_lo; j < j_hi; ++j) {
      Vec k[B];
      for (int b = 0; b < B; ++b) k[b] = Load(k_row + j * o + b * kLanes);
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p) {
        const float v = in_row[p * pixel_step + j];
        for (int b = 0; b < B; ++b) acc[p][b] += v * k[b];
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < B; ++b) Store(out + p * o + b * kLanes, acc[p][b]);
}

using ForwardTileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                               int64_t, int64_t, int64_t, int64_t, float*);

template <int B, int... P>
constexpr std::array<ForwardTileFn, sizeof...(P)> ForwardTiles(std::integer_sequence<int, P...>) {
  return {&ForwardTile<P + 1, B>...};
}

constexpr auto kForward1 = ForwardTiles<1>(std::make_integer_sequence<int, MaxTilePixels(1)>());
constexpr auto kForward2 = ForwardTiles<2>(std::make_integer_sequence<int, MaxTilePixels(2)>());
constexpr auto kForward4 = ForwardTiles<4>(std::make_integer_sequence<int, MaxTilePixels(4)>());

int BlocksPerTile(int64_t o) { return o % (4 * kLanes) == 0 ? 4 : o % (2 * kLanes) == 0 ? 2 : 1; }

ForwardTileFn ForwardTileFor(int b, int64_t p) {
  return b == 4 ? kForward4[p - 1] : b == 2 ? kForward2[p - 1] : kForward1[p - 1];
}

void Forward(ffi::ThreadPool& pool, const Geometry& g, const float* in, const float* kernel,
             float* out) {
  const int b = BlocksPerTile(g.o);
  const int64_t run = g.RowRun(), pixel_step = g.sw * g.c, row_step = g.w * g.c;
  const auto [first, last] = g.InteriorColumns();
  // Interior columns in equal tiles of at most MaxTilePixels(b) pixels.
  const int64_t interior = last - first;
  const int64_t tiles = (interior + MaxTilePixels(b) - 1) / MaxTilePixels(b);
  const int64_t tile_pixels = tiles ? (interior + tiles - 1) / tiles : 0;
  ParallelFor(pool, g.n * g.ho, [&](int64_t row) {
    const int64_t n = row / g.ho, y = row % g.ho;
    const int64_t y0 = y * g.sh - g.ph;
    const auto [kh_lo, kh_hi] = g.Taps(y0, g.kh, g.h);
    // Offsets may be negative for padded windows; only in-bounds elements are read.
    const int64_t row_origin = (n * g.h + y0) * row_step;
    float* out_row = out + row * g.wo * g.o;
    // Every output channel block of a tile before the next tile: the tile's input stays
    // in the L1 cache while the kernel streams through (from L2 for large kernels).
    auto column = [&](int64_t x, int64_t pixels, int64_t j_lo, int64_t j_hi) {
      const int64_t origin = row_origin + (x * g.sw - g.pw) * g.c;
      for (int64_t ob = 0; ob < g.o; ob += b * kLanes)
        ForwardTileFor(b, pixels)(in + origin, pixel_step, row_step, kernel + ob, g.o, run, kh_lo,
                                  kh_hi, j_lo, j_hi, out_row + x * g.o + ob);
    };
    for (int64_t x = first; x < last; x += tile_pixels)
      column(x, std::min(tile_pixels, last - x), 0, run);
    g.ForEachEdgeColumn([&](int64_t x, int64_t j_lo, int64_t j_hi) { column(x, 1, j_lo, j_hi); });
  });
}

// ---------------------------------------------------------------------------------------
// Weight gradient: dk[i, j, c, o] = sum over n, y, x of in[n, y*sh + i - ph, x*sw + j - pw, c]
// * grad[n, y, x, o] (taps outside the input contribute nothing).

// Adds one image's contribution to a tile of R consecutive run elements [j0, j0 + R) of
// kernel row i by B * kLanes output channels, held at `acc_out` (row stride o).
template <int R, int B>
void WeightGradTile(const Geometry& g, const float* in_image, const float* grad_image, int64_t i,
                    int64_t j0, int64_t ob, float* acc_out) {
  Vec acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = Load(acc_out + r * g.o + b * kLanes);
  const int64_t row_step = g.w * g.c, pixel_step = g.sw * g.c;
  const auto [first, last] = g.InteriorColumns();
  for (int64_t y = 0; y < g.ho; ++y) {
    const int64_t in_y = y * g.sh + i - g.ph;
    if (in_y < 0 || in_y >= g.h) continue;
    const float* in_row = in_image + in_y * row_step - g.pw * g.c + j0;  // + x * pixel_step
    const float* grad_row = grad_image + y * g.wo * g.o + ob;
    for (int64_t x = first; x < last; ++x) {
      Vec d[B];
      for (int b = 0; b < B; ++b) d[b] = Load(grad_row + x * g.o + b * kLanes);
      const float* v = in_row + x * pixel_step;
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < B; ++b) acc[r][b] += v[r] * d[b];
    }
    g.ForEachEdgeColumn([&](int64_t x, int64_t j_lo, int64_t j_hi) {  // only the taps inside
      Vec d[B];
      for (int b = 0; b < B; ++b) d[b] = Load(grad_row + x * g.o + b * kLanes);
      const float* v = in_row + x * pixel_step;
      for (int r = 0; r < R; ++r) {
        const int64_t j = j0 + r;
        if (j < j_lo || j >= j_hi) continue;
        for (int b = 0; b < B; ++b) acc[r][b] += v[r] * d[b];
      }
    });
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) Store(acc_out + r * g.o + b * kLanes, acc[r][b]);
}

using WeightGradTileFn = void (*)(const Geometry&, const float*, const float*, int64_t, int64_t,
                                  int64_t, float*);

template <int B, int... R>
constexpr std::array<WeightGradTileFn, sizeof...(R)> WeightGradTiles(
    std::integer_sequence<int, R...>) {
  return {&WeightGradTile<R + 1, B>...};
}

constexpr auto kWeightGrad1 = WeightGradTiles<1>(std::make_integer_sequence<int, MaxTilePixels(1)>());
constexpr auto kWeightGrad2 = WeightGradTiles<2>(std::make_integer_sequence<int, MaxTilePixels(2)>());
constexpr auto kWeightGrad4 = WeightGradTiles<4>(std::make_integer_sequence<int, MaxTilePixels(4)>());

WeightGradTileFn WeightGradTileFor(int b, int64_t r) {
  return b == 4 ? kWeightGrad4[r - 1] : b == 2 ? kWeightGrad2[r - 1] : kWeightGrad1[r - 1];
}

// The batch is cut into `parts` runs of consecutive images, each summed into its own copy
// of the gradient by one thread (one image's input and output gradient stay in cache across
// all its tiles), then the copies are added in order. `parts` depends on the shapes only.
void WeightGrad(ffi::ThreadPool& pool, const Geometry& g, const float* in, const float* grad,
                float* out) {
  const int b = BlocksPerTile(g.o);
  const int64_t run = g.RowRun(), size = g.kh * run * g.o;
  const int64_t max_rows = MaxTilePixels(b);
  constexpr int64_t kMaxParts = 16, kPartBudget = 32 << 20;  // bytes for the copies
  const int64_t parts = std::clamp<int64_t>(
      std::min<int64_t>(kMaxParts, kPartBudget / (size * int64_t{sizeof(float)})), 1, g.n);
  std::vector<float> copies(parts * size, 0.0f);
  ParallelFor(pool, parts, [&](int64_t part) {
    float* total = copies.data() + part * size;
    for (int64_t n = g.n * part / parts; n < g.n * (part + 1) / parts; ++n) {
      const float* in_image = in + n * g.h * g.w * g.c;
      const float* grad_image = grad + n * g.ho * g.wo * g.o;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j0 = 0; j0 < run; j0 += max_rows)
          for (int64_t ob = 0; ob < g.o; ob += b * kLanes)
            WeightGradTileFor(b, std::min(max_rows, run - j0))(
                g, in_image, grad_image, i, j0, ob, total + (i * run + j0) * g.o + ob);
    }
  });
  constexpr int64_t kSumChunk = 1 << 14;
  ParallelFor(pool, (size + kSumChunk - 1) / kSumChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kSumChunk, end = std::min(size, begin + kSumChunk);
    for (int64_t e = begin; e < end; ++e) {
      float sum = copies[e];
      for (int64_t part = 1; part < parts; ++part) sum += copies[part * size + e];
      out[e] = sum;
    }
  });
}

// ---------------------------------------------------------------------------------------
// FFI handlers.

// Both handlers read one convolution's shapes from an NHWC input, an HWIO kernel and the
// NHWC output (whichever of them is the result) and take the same attributes.
Geometry GeometryOf(ffi::Span<const int64_t> in, ffi::Span<const int64_t> kernel,
                    ffi::Span<const int64_t> out, int64_t stride_h, int64_t stride_w,
                    int64_t pad_h, int64_t pad_w) {
  return Geometry{in[0], in[1], in[2], in[3], kernel[0], kernel[1], kernel[3], out[1], out[2],
                  stride_h, stride_w, pad_h, pad_w};
}

ffi::Error ChannelError() {
  return ffi::Error::InvalidArgument("output channels must be a multiple of 16");
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Image>()
      .Arg<Image>()
      .Ret<Image>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_h")
      .Attr<int64_t>("pad_w");
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, Image in, Image kernel, ImageResult out,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w) {
  const Geometry g = GeometryOf(in.dimensions(), kernel.dimensions(), out->dimensions(),
                                stride_h, stride_w, pad_h, pad_w);
  if (g.o % kChannelMultiple != 0) return ChannelError();
  Forward(pool, g, in.typed_data(), kernel.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, Image in, Image grad, ImageResult out,
                          int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w) {
  const Geometry g = GeometryOf(in.dimensions(), out->dimensions(), grad.dimensions(),
                                stride_h, stride_w, pad_h, pad_w);
  if (g.o % kChannelMultiple != 0) return ChannelError();
  WeightGrad(pool, g, in.typed_data(), grad.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvForward, ForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvWeightGrad, WeightGradImpl, Binding());
