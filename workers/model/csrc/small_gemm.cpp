// Small-M float32 linear for x86 CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ W[N, K]^T (+ bias),
// W float32 or bfloat16. Built at load time by fast_linear.py (torch.utils.cpp_extension, cached
// on disk); registers torch.ops.minedraft_kernels.{pack, linear}. Must not change results
// between batch shapes.
//
// Why: a decode or verify step multiplies a few rows (M = 1..16) by every weight of the model,
// so the step is bound by reading the weights once. BLAS kernels tuned for large M re-read or
// repack W per call and run at a fraction of memory speed there. Here W is packed once into
// panels of 16 output columns, [P, K, 16], streamed exactly once per call, and every row of x
// is multiplied against the panel while it sits in L1.
//
// Exactness: each y[m, n] is one FMA chain over k = 0..K-1 in order, started from zero, then
// plus bias. Storing and reloading the partial sum between K chunks is exact, so the result
// does not depend on M, on how rows are blocked, or on the thread count: a row's output is
// the same alone or in any batch (batch invariance).
//
// Weights may also be packed as bfloat16 (a draft model's, to halve the bytes a step reads):
// widening bfloat16 to float32 is exact (the 16 bits become the top of the float), so the
// result is the float32 chain over the rounded weights, with the same invariance.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int64_t NR = 16;     // output columns per panel: two 8-float vectors
constexpr int64_t KC = 128;    // k per chunk: an 8 KiB slice of a panel (4 KiB in bfloat16), reused from L1
//                                by every row block (measured: 5-15% faster than 256 at M = 5..16 on
//                                small and large shapes but 1536x8960 at M = 16, 4% slower; level at M = 1)
constexpr int64_t MR_MAX = 6;  // rows per micro-kernel call: 12 accumulators + 2 panel vectors + 1 broadcast
constexpr int64_t PREFETCH_MIN_ROWS = 3;  // below this the hardware prefetcher alone streams faster (measured)

// acc[r] (+)= a[r, 0:kc] @ b[0:kc, 0:16] for MR rows; c holds the running sums (row stride ldc).
// Each step also prefetches prefetch + k * prefetch_step: the row blocks of one chunk share the
// prefetch of the next chunk evenly, so the weight stream never waits for the arithmetic
// (measured: 1.3-1.5x faster at M = 8..40 than no prefetch or prefetching in the first block;
// at M = 1..2 it is slower than none, so prefetch is null there).
// Eight weights as float32: a load, or for bfloat16 a load and an exact widening shift.
inline __m256 load8(const float* p) { return _mm256_load_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_load_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// Fully unrolled over rows (MR is a constant), so that the 2 x MR accumulators live in registers:
// GCC kept them on the stack, one store per FMA, once this was no longer inlined into its caller.
#define MD_UNROLL_ROWS _Pragma("GCC unroll 6")

template <int MR, typename W>
__attribute__((always_inline)) inline void micro_kernel(const float* __restrict a, int64_t lda, const W* __restrict b, int64_t kc,
                         float* __restrict c, int64_t ldc, bool is_first, const char* prefetch,
                         int64_t prefetch_step) {
  __m256 acc[MR][2];
  MD_UNROLL_ROWS
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = is_first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc);
    acc[r][1] = is_first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    if (prefetch != nullptr) _mm_prefetch(prefetch + k * prefetch_step, _MM_HINT_T0);
    const __m256 b0 = load8(b + k * NR);
    const __m256 b1 = load8(b + k * NR + 8);
    MD_UNROLL_ROWS
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  MD_UNROLL_ROWS
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

template <typename W>
void run_micro_kernel(int mr, const float* a, int64_t lda, const W* b, int64_t kc, float* c, int64_t ldc,
                      bool is_first, const char* prefetch, int64_t prefetch_step) {
  switch (mr) {
    case 1: micro_kernel<1, W>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 2: micro_kernel<2, W>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 3: micro_kernel<3, W>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 4: micro_kernel<4, W>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 5: micro_kernel<5, W>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    default: micro_kernel<6, W>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
  }
}

// One panel (16 output columns) for all M rows: K in chunks, rows in balanced blocks of <= 6.
template <typename W>
void panel_product(const float* x, int64_t M, int64_t K, const W* panel, const float* bias, int64_t N,
                   int64_t n0, float* y) {
  const int64_t num_cols = std::min(NR, N - n0);
  const int64_t num_blocks = (M + MR_MAX - 1) / MR_MAX;
  alignas(32) float edge[MR_MAX * NR];  // running sums of a last panel narrower than 16 columns
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    int64_t m0 = 0;
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int mr = static_cast<int>(M / num_blocks + (block < M % num_blocks ? 1 : 0));
      const float* a = x + m0 * K + k0;
      // This block's share of the next chunk (the next panel's first chunk after the last).
      const char* prefetch = M < PREFETCH_MIN_ROWS ? nullptr
          : reinterpret_cast<const char*>(panel + (k0 + kc) * NR) + block * kc * NR * sizeof(W) / num_blocks;
      const int64_t step = NR * sizeof(W) / num_blocks;  // bytes per k
      float* c = y + m0 * N + n0;
      int64_t ldc = N;
      if (num_cols < NR) {
        for (int r = 0; r < mr; ++r) std::copy_n(y + (m0 + r) * N + n0, num_cols, edge + r * NR);
        c = edge, ldc = NR;
      }
      run_micro_kernel(mr, a, K, panel + k0 * NR, kc, c, ldc, k0 == 0, prefetch, step);
      if (num_cols < NR) {
        for (int r = 0; r < mr; ++r) std::copy_n(edge + r * NR, num_cols, y + (m0 + r) * N + n0);
      }
      m0 += mr;
    }
  }
  if (bias != nullptr) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < num_cols; ++j) y[m * N + n0 + j] += bias[n0 + j];
  }
}

template <typename W>
void pack_panels(const W* src, int64_t N, int64_t K, W* dst) {
  at::parallel_for(0, (N + NR - 1) / NR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t num_cols = std::min(NR, N - p * NR);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {  // a KC x 16 tile at a time: both sides stay in cache
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t j = 0; j < num_cols; ++j) {
          const W* row = src + (p * NR + j) * K + k0;
          W* col = dst + (p * K + k0) * NR + j;
          for (int64_t k = 0; k < kc; ++k) col[k * NR] = row[k];
        }
      }
    }
  });
}

// W [N, K] -> panels [P, K, 16] of the same dtype (float32 or bfloat16), P = ceil(N / 16),
// columns past N zero.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "pack: expected a 2-D float32 or bfloat16 CPU weight, got ", weight.sizes(), " ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor packed = at::empty({P, K, NR}, w.options());
  if (N % NR != 0) packed.select(0, P - 1).zero_();  // columns past N of the last panel
  if (w.scalar_type() == at::kFloat) {
    pack_panels(w.data_ptr<float>(), N, K, packed.data_ptr<float>());
  } else {
    pack_panels(w.data_ptr<c10::BFloat16>(), N, K, packed.data_ptr<c10::BFloat16>());
  }
  return packed;
}

template <typename W>
void product(const float* x, int64_t M, int64_t K, const W* packed, int64_t P, const float* bias, int64_t N,
             float* y) {
  // Threads split the panels: each output is computed by one thread, in the same order.
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) panel_product(x, M, K, packed + p * K * NR, bias, N, p * NR, y);
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == NR &&
                  packed.size(1) == x.size(1) && packed.size(0) == (N + NR - 1) / NR && N > 0 &&
                  (packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kBFloat16),
              "linear: packed weight ", packed.sizes(), " ", packed.scalar_type(), " does not fit x ", x.sizes(),
              " and N=", N);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0, "linear: packed weight not 32-byte aligned");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                                     bias->scalar_type() == at::kFloat),
              "linear: bias must be a contiguous float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (packed.scalar_type() == at::kFloat) {
    product(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), P, bp, N, y.data_ptr<float>());
  } else {
    product(x.data_ptr<float>(), M, K, packed.data_ptr<c10::BFloat16>(), P, bp, N, y.data_ptr<float>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(minedraft_kernels, m) {
  m.def("pack(Tensor weight) -> Tensor", &pack);
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor", &linear);
}
