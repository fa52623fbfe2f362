// Small-M float32 linear for x86 CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
// Built at load time by fast_linear.py (torch.utils.cpp_extension, cached on disk); registers
// torch.ops.minedraft_kernels.{pack, linear}. Must not change results between batch shapes.
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

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int64_t NR = 16;     // output columns per panel: two 8-float vectors
constexpr int64_t KC = 256;    // k per chunk: a 16 KiB slice of a panel, reused from L1 by every row block
constexpr int64_t MR_MAX = 6;  // rows per micro-kernel call: 12 accumulators + 2 panel vectors + 1 broadcast
constexpr int64_t PREFETCH_MIN_ROWS = 3;  // below this the hardware prefetcher alone streams faster (measured)

// acc[r] (+)= a[r, 0:kc] @ b[0:kc, 0:16] for MR rows; c holds the running sums (row stride ldc).
// Each step also prefetches prefetch + k * prefetch_step: the row blocks of one chunk share the
// prefetch of the next chunk evenly, so the weight stream never waits for the arithmetic
// (measured: 1.3-1.5x faster at M = 8..40 than no prefetch or prefetching in the first block;
// at M = 1..2 it is slower than none, so prefetch is null there).
template <int MR>
inline void micro_kernel(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t kc,
                         float* __restrict c, int64_t ldc, bool is_first, const float* prefetch,
                         int64_t prefetch_step) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = is_first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc);
    acc[r][1] = is_first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    if (prefetch != nullptr) _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * prefetch_step), _MM_HINT_T0);
    const __m256 b0 = _mm256_load_ps(b + k * NR);
    const __m256 b1 = _mm256_load_ps(b + k * NR + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

void run_micro_kernel(int mr, const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc,
                      bool is_first, const float* prefetch, int64_t prefetch_step) {
  switch (mr) {
    case 1: micro_kernel<1>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 2: micro_kernel<2>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 3: micro_kernel<3>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 4: micro_kernel<4>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    case 5: micro_kernel<5>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
    default: micro_kernel<6>(a, lda, b, kc, c, ldc, is_first, prefetch, prefetch_step); break;
  }
}

// One panel (16 output columns) for all M rows: K in chunks, rows in balanced blocks of <= 6.
void panel_product(const float* x, int64_t M, int64_t K, const float* panel, const float* bias, int64_t N,
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
      const float* prefetch = M < PREFETCH_MIN_ROWS ? nullptr : panel + (k0 + kc) * NR + block * kc * NR / num_blocks;
      const int64_t step = NR / num_blocks;
      if (num_cols == NR) {
        run_micro_kernel(mr, a, K, panel + k0 * NR, kc, y + m0 * N + n0, N, k0 == 0, prefetch, step);
      } else {
        for (int r = 0; r < mr; ++r) std::copy_n(y + (m0 + r) * N + n0, num_cols, edge + r * NR);
        run_micro_kernel(mr, a, K, panel + k0 * NR, kc, edge, NR, k0 == 0, prefetch, step);
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

// W [N, K] -> panels [P, K, 16], P = ceil(N / 16), columns past N zero.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack: expected a 2-D float32 CPU weight, got ", weight.sizes(), " ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor packed = at::empty({P, K, NR}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  if (N % NR != 0) packed.select(0, P - 1).zero_();  // columns past N of the last panel
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t num_cols = std::min(NR, N - p * NR);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {  // a KC x 16 tile at a time: both sides stay in cache
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t j = 0; j < num_cols; ++j) {
          const float* row = src + (p * NR + j) * K + k0;
          float* col = dst + (p * K + k0) * NR + j;
          for (int64_t k = 0; k < kc; ++k) col[k * NR] = row[k];
        }
      }
    }
  });
  return packed;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == NR &&
                  packed.size(1) == x.size(1) && packed.size(0) == (N + NR - 1) / NR && N > 0 &&
                  packed.scalar_type() == at::kFloat,
              "linear: packed weight ", packed.sizes(), " does not fit x ", x.sizes(), " and N=", N);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0, "linear: packed weight not 32-byte aligned");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                                     bias->scalar_type() == at::kFloat),
              "linear: bias must be a contiguous float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Threads split the panels: each output is computed by one thread, in the same order.
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) panel_product(xp, M, K, wp + p * K * NR, bp, N, p * NR, yp);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(minedraft_kernels, m) {
  m.def("pack(Tensor weight) -> Tensor", &pack);
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor", &linear);
}
