// The boundary-vector scan of tnkd.tn.chain (method="native"): K chains of S steps
// v_{i+1} = M_i (phi_i (x) v_i), vectors as (D, B) columns, every `every`-th output and the last
// divided by their max-abs. Step i of chain k reads block index[k][i] of the merged cores,
// natural layout (l, s, r), and of the block features (s, b); an in_first chain enters a block
// on l, the others on r. A step is one pass of register-tiled SIMD loops over L1-resident data,
// one chain per thread. The pair merges, block features and output core around the scan make
// tnkd.tn.chain._NativeChain one autograd node with no ATen kernel per site.

#include <torch/extension.h>

#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using namespace tnkd_simd;

// out (rows, cols) = a (rows, depth) @ b (depth, ldb), a[r*ar + k*ak]: a small matrix
// product vectorised along the columns (the pair merges, their gradient, the output core).
template <typename T>
void small_matmul(const T* a, int64_t ar, int64_t ak, int64_t rows, int64_t depth, const T* b,
                  int64_t ldb, int64_t cols, T* out, int64_t ldo) {
  constexpr int64_t L = Vec<T>::lanes;
  int64_t j0 = 0;
  for (; j0 + 2 * L <= cols; j0 += 2 * L)
    mm_rows<T, 4, 2>(a, {ar, 0, ak}, 1, depth, rows, b, ldb, out, ldo, j0, 2 * L);
  for (; j0 + L <= cols; j0 += L)
    mm_rows<T, 4, 1>(a, {ar, 0, ak}, 1, depth, rows, b, ldb, out, ldo, j0, L);
  for (int64_t i = 0; i < rows; ++i)  // the last cols % L columns
    for (int64_t j = j0; j < cols; ++j) {
      T acc = 0;
      for (int64_t k = 0; k < depth; ++k) acc += a[i * ar + k * ak] * b[k * ldb + j];
      out[i * ldo + j] = acc;
    }
}

// One step: x[s][i][b] = phi[s][b] v[i][b] (zero for batch <= b < padded), then out (bond,
// batch) = A (bond, m*bond) @ x, A read in place with strides st.
template <typename T>
void step(const T* phi, const T* v, const T* A, Strides st, int64_t m, int64_t bond,
          int64_t batch, int64_t padded, T* x, T* out) {
  for (int64_t s = 0; s < m; ++s)
    for (int64_t i = 0; i < bond; ++i) {
      T* row = x + (s * bond + i) * padded;
      const T* p = phi + s * batch;
      const T* vi = v + i * batch;
      for (int64_t b = 0; b < batch; ++b) row[b] = p[b] * vi[b];
      for (int64_t b = batch; b < padded; ++b) row[b] = 0;
    }
  constexpr int64_t L = Vec<T>::lanes;  // register tiles along b; x is readable to `padded`
  int64_t j0 = 0;
  for (; j0 + 2 * L <= batch; j0 += 2 * L)
    mm_rows<T, 4, 2>(A, st, m, bond, bond, x, padded, out, batch, j0, 2 * L);
  for (; j0 < batch; j0 += L)
    mm_rows<T, 4, 1>(A, st, m, bond, bond, x, padded, out, batch, j0, std::min(L, batch - j0));
}

// peak[b] = the max-abs of column b of x (rows, batch), at least tiny (NaN propagates, as in
// amax); the column divided by it.
template <typename T>
void normalise_columns(T* x, int64_t rows, int64_t batch, T* peak) {
  std::fill(peak, peak + batch, std::numeric_limits<T>::min());
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t b = 0; b < batch; ++b) {
      const T a = std::abs(x[o * batch + b]);
      peak[b] = (a > peak[b] || a != a) ? a : peak[b];
    }
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t b = 0; b < batch; ++b) x[o * batch + b] /= peak[b];
}

// Each tensor checked (on the CPU, with the given number of dimensions) and made contiguous.
void check(std::initializer_list<std::tuple<at::Tensor&, const char*, int64_t>> tensors) {
  for (const auto& [t, name, dim] : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "chain_scan: ", name, " must be on the CPU");
    TORCH_CHECK(t.dim() == dim, "chain_scan: ", name, " must have ", dim, " dimensions, got ",
                t.dim());
    t = t.contiguous();
  }
}

// The strides of chain step matrices in a natural (D, m, D) block: a forward step maps the
// entry bond to the exit bond, a backward step the exit bond's gradient to the entry bond's.
Strides step_strides(bool in_first, bool forward, int64_t m, int64_t bond) {
  if (in_first == forward) return {1, bond, m * bond};  // A(o, s, i) = block[i][s][o]
  return {m * bond, bond, 1};                           // A(o, s, i) = block[o][s][i]
}

// A scan's sizes and plan: K chains of S steps over n blocks of block features (n, m, B), vectors
// (K, D, B), R renormalisations (renorm[i]: after step i).
struct Scan {
  int64_t K, D, B, n, m, S, R;
  std::vector<int64_t> index;  // (K, S)
  std::vector<bool> in_first, renorm;
};

// The scan of `vectors` (start or gradient), checked against blocks, features (both checked
// and made contiguous) and the plan.
Scan read_scan(const at::Tensor& vectors, at::Tensor& blocks, at::Tensor& features,
               at::Tensor idx, const std::vector<bool>& in_first, int64_t every) {
  TORCH_CHECK(vectors.device().is_cpu() && vectors.dim() == 3,
              "chain_scan: vectors (K, D, B) on the CPU expected");  // may stay strided
  check({{blocks, "blocks", 3}, {features, "features", 3}, {idx, "index", 2}});
  Scan sc{vectors.size(0), vectors.size(1), vectors.size(2), blocks.size(0), features.size(1),
          idx.size(1),     0,               {},              in_first,       {}};
  const auto dtype = vectors.scalar_type();
  TORCH_CHECK(blocks.size(1) == sc.D * sc.m && blocks.size(2) == sc.D &&
                  features.size(0) == sc.n && features.size(2) == sc.B &&
                  blocks.scalar_type() == dtype && features.scalar_type() == dtype,
              "chain_scan: inconsistent shapes or dtypes");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.size(0) == sc.K &&
                  static_cast<int64_t>(in_first.size()) == sc.K,
              "chain_scan: one int64 index row and one in_first flag per chain expected");
  const int64_t* p = idx.data_ptr<int64_t>();
  sc.index.assign(p, p + sc.K * sc.S);
  for (int64_t b : sc.index)
    TORCH_CHECK(b >= 0 && b < sc.n, "chain_scan: block index out of range");
  for (int64_t i = 0; i < sc.S; ++i) sc.renorm.push_back((i + 1) % every == 0 || i == sc.S - 1);
  sc.R = std::count(sc.renorm.begin(), sc.renorm.end(), true);
  return sc;
}

// ends (2, D, B) and the output core (D, C, D) between them, checked and made contiguous.
void check_output(at::Tensor& ends, at::Tensor& out_core) {
  check({{ends, "ends", 3}, {out_core, "output_core", 3}});
  const int64_t D = ends.size(1);
  TORCH_CHECK(ends.size(0) == 2 && out_core.size(0) == D && out_core.size(2) == D &&
                  out_core.scalar_type() == ends.scalar_type(),
              "chain_scan: ends (2, D, B) and an output core (D, C, D) of their dtype expected");
}

}  // namespace

// start (K, D, B), blocks (n, D*m, D) merged cores in natural layout (l, s, r), features (n, m, B)
// block features, index (K, S) which block each step reads -> vs (S+1, K, D, B) (every step's input
// and the last output), scales (R, K, 1, B), the log-scales (K, B) (the sum of the scales'
// logarithms), whether the scan stayed in float range (every scale finite and at least tiny / eps,
// as tnkd.tn.chain._scan checks) and whether the last vectors are finite.
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool, bool> scan_forward(
    at::Tensor start, at::Tensor blocks, at::Tensor features, at::Tensor index,
    std::vector<bool> in_first, int64_t every) {
  const Scan sc = read_scan(start, blocks, features, index, in_first, every);
  const int64_t K = sc.K, D = sc.D, B = sc.B, m = sc.m, S = sc.S;
  auto vs = at::empty({S + 1, K, D, B}, start.options());
  auto scales = at::empty({sc.R, K, 1, B}, start.options());
  auto log_scale = at::zeros({K, B}, start.options());
  vs[0].copy_(start);
  bool healthy = true, finite = true;
  AT_DISPATCH_FLOATING_TYPES(start.scalar_type(), "scan_forward", [&] {
    using T = scalar_t;
    const int64_t padded = padded_width<T>(B);
    T* v_ptr = vs.data_ptr<T>();
    T* s_ptr = scales.data_ptr<T>();
    const T* c_ptr = blocks.data_ptr<T>();
    const T* f_ptr = features.data_ptr<T>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> x(m * D * padded);
      for (int64_t k = k0; k < k1; ++k) {
        const Strides st = step_strides(sc.in_first[k], true, m, D);
        T* logs = log_scale.data_ptr<T>() + k * B;
        for (int64_t i = 0, r = 0; i < S; ++i) {
          const int64_t blk = sc.index[k * S + i];
          T* out = v_ptr + ((i + 1) * K + k) * D * B;
          step(f_ptr + blk * m * B, out - K * D * B, c_ptr + blk * D * m * D, st, m, D, B, padded,
               x.data(), out);
          if (sc.renorm[i]) {
            T* peak = s_ptr + (r++ * K + k) * B;
            normalise_columns(out, D, B, peak);
            for (int64_t b = 0; b < B; ++b) logs[b] += std::log(peak[b]);
          }
        }
      }
    });
    const T low = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
    healthy = all_within(s_ptr, scales.numel(), low, std::numeric_limits<T>::max());
    finite = all_within(v_ptr + S * K * D * B, K * D * B);
  });
  return {vs, scales, log_scale, healthy, finite};
}

// grad (K, D, B), blocks, features, index, in_first as for scan_forward, vs and scales as it
// returned them -> gs (S+1, K, D, B) (gs[i+1] the gradient of step i's output after its
// renormalisation's division, gs[0] of the start) and, with core_grads, the gradients of the
// merged blocks (n, D*m, D), natural layout: a step's G[(s, out), in] = sum_b (phi (x) g)[(s,
// out), b] v_in[in, b] lands on block[l][s][r] with (in, out) = (l, r) for an in_first chain,
// (r, l) otherwise. A block read by several steps (the identity block that pads the shorter of
// two chains: a constant) gets the first one's gradient; a block read by none, zero. Also
// returns whether grad and gs[0] are finite. Without keep_all, gs is (1, K, D, B), only the
// start's gradient (the others live in a two-slot ring: less memory traffic).
std::tuple<at::Tensor, at::Tensor, bool, bool> scan_backward(
    at::Tensor grad, at::Tensor blocks, at::Tensor features, at::Tensor index,
    std::vector<bool> in_first, at::Tensor vs, at::Tensor scales, int64_t every, bool core_grads,
    bool keep_all) {
  check({{grad, "grad", 3}, {vs, "vs", 4}, {scales, "scales", 4}});
  const Scan sc = read_scan(grad, blocks, features, index, in_first, every);
  const int64_t K = sc.K, D = sc.D, B = sc.B, n = sc.n, m = sc.m, S = sc.S;
  TORCH_CHECK(scales.size(0) == sc.R && vs.size(0) == S + 1, "chain_scan: inconsistent shapes");
  // which step writes each block's gradient: the first (in chain, then step order) to read it
  std::vector<char> writes(K * S, 0), seen(n, 0);
  for (int64_t j = 0; j < K * S; ++j)
    if (!seen[sc.index[j]]) seen[sc.index[j]] = writes[j] = 1;
  auto gs = at::empty({keep_all ? S + 1 : 1, K, D, B}, grad.options());
  auto g_blocks = core_grads ? at::empty({n, D * m, D}, grad.options()) : at::Tensor();
  if (core_grads)
    for (int64_t b = 0; b < n; ++b)
      if (!seen[b]) g_blocks[b].zero_();
  if (keep_all) gs[S].copy_(grad);
  bool grad_finite = true, start_finite = true;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "scan_backward", [&] {
    using T = scalar_t;
    const int64_t padded = padded_width<T>(B), ldv = padded_width<T>(D);
    T* g_ptr = gs.data_ptr<T>();
    T* gb_ptr = core_grads ? g_blocks.data_ptr<T>() : nullptr;
    const T* c_ptr = blocks.data_ptr<T>();
    const T* f_ptr = features.data_ptr<T>();
    const T* v_ptr = vs.data_ptr<T>();
    const T* s_ptr = scales.data_ptr<T>();
    const T* grad_ptr = grad.data_ptr<T>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> x(m * D * padded), vt(core_grads ? B * ldv : 0, T(0));
      std::vector<T> G(core_grads ? m * D * D : 0), ring(keep_all ? 0 : 2 * D * B);
      for (int64_t k = k0; k < k1; ++k) {
        const Strides st = step_strides(sc.in_first[k], false, m, D);
        if (!keep_all) std::copy(grad_ptr + k * D * B, grad_ptr + (k + 1) * D * B, ring.data());
        for (int64_t i = S - 1, r = sc.R; i >= 0; --i) {
          const int64_t blk = sc.index[k * S + i];
          // the gradient of step i's output, and where that of its input goes
          T* g = keep_all ? g_ptr + ((i + 1) * K + k) * D * B : &ring[((S - 1 - i) % 2) * D * B];
          T* g_in = keep_all ? g_ptr + (i * K + k) * D * B : &ring[((S - i) % 2) * D * B];
          if (sc.renorm[i]) {
            const T* scale = s_ptr + (--r * K + k) * B;
            for (int64_t o = 0; o < D; ++o)
              for (int64_t b = 0; b < B; ++b) g[o * B + b] /= scale[b];
          }
          step(f_ptr + blk * m * B, g, c_ptr + blk * D * m * D, st, m, D, B, padded, x.data(),
               g_in);
          if (core_grads && writes[k * S + i]) {
            const T* v = v_ptr + (i * K + k) * D * B;
            for (int64_t c = 0; c < D; ++c)
              for (int64_t b = 0; b < B; ++b) vt[b * ldv + c] = v[c * B + b];
            gram<T, false>(x.data(), m * D, padded, vt.data(), ldv, B, G.data(), D);
            T* dst = gb_ptr + blk * D * m * D;  // [l][s][r]
            for (int64_t s = 0; s < m; ++s)
              for (int64_t o = 0; o < D; ++o)
                for (int64_t c = 0; c < D; ++c) {
                  const T value = G[(s * D + o) * D + c];  // (s, out), in
                  if (sc.in_first[k])
                    dst[(c * m + s) * D + o] = value;  // l = in, r = out
                  else
                    dst[(o * m + s) * D + c] = value;  // l = out, r = in
                }
          }
        }
        if (!keep_all) {
          const T* g0 = &ring[(S % 2) * D * B];
          std::copy(g0, g0 + D * B, g_ptr + k * D * B);
        }
      }
    });
    grad_finite = all_within(grad_ptr, K * D * B);
    start_finite = all_within(g_ptr, K * D * B);
  });
  return {gs, g_blocks, grad_finite, start_finite};
}

// The gradients of pairs of sites from those of their merged blocks: sites (2n, D, d, D),
// g_blocks (n, D*d*d, D) with M[l][s1][s2][r] = sum_c A1[l][s1][c] A2[c][s2][r] ->
// (2n, D, d, D): g_A1[l][s1][c] = sum_{s2, r} g_M[l][s1][s2][r] A2[c][s2][r] and
// g_A2[c][s2][r] = sum_{l, s1} A1[l][s1][c] g_M[l][s1][s2][r].
at::Tensor unmerge_pairs(at::Tensor g_blocks, at::Tensor sites) {
  check({{g_blocks, "g_blocks", 3}, {sites, "sites", 4}});
  const int64_t n2 = sites.size(0), D = sites.size(1), d = sites.size(2), n = n2 / 2;
  TORCH_CHECK(n2 % 2 == 0 && g_blocks.size(0) == n && g_blocks.size(1) == D * d * d &&
                  g_blocks.size(2) == D && sites.scalar_type() == g_blocks.scalar_type(),
              "chain_scan: inconsistent shapes");
  auto grads = at::empty_like(sites);
  const int64_t row = d * D, site = D * d * D;  // (s, r) entries of a site row; a site's size
  AT_DISPATCH_FLOATING_TYPES(sites.scalar_type(), "unmerge_pairs", [&] {
    using T = scalar_t;
    const int64_t ldv = padded_width<T>(D);
    const T* a_ptr = sites.data_ptr<T>();
    const T* g_ptr = g_blocks.data_ptr<T>();
    T* o_ptr = grads.data_ptr<T>();
    at::parallel_for(0, n, 8, [&](int64_t b0, int64_t b1) {
      std::vector<T> a2t(row * ldv, T(0));  // A2 transposed, [(s2, r)][c], zero-padded
      for (int64_t blk = b0; blk < b1; ++blk) {
        const T* a1 = a_ptr + 2 * blk * site;  // [(l, s1)][c]
        const T* a2 = a1 + site;               // [c][(s2, r)]
        const T* gm = g_ptr + blk * site * d;  // [(l, s1)][(s2, r)]
        T* g1 = o_ptr + 2 * blk * site;
        for (int64_t c = 0; c < D; ++c)
          for (int64_t j = 0; j < row; ++j) a2t[j * ldv + c] = a2[c * row + j];
        // g_A1 = g_M A2^T, g_A2 = A1^T g_M
        gram<T, false>(gm, D * d, row, a2t.data(), ldv, row, g1, D);
        small_matmul(a1, 1, D, D, D * d, gm, row, row, g1 + site, row);
      }
    });
  });
  return grads;
}

// Merged cores of pairs of sites: sites (2n, D, d, D) -> (n, D*d*d, D),
// M[l][s1][s2][r] = sum_c A1[l][s1][c] A2[c][s2][r] (tnkd.tn.chain._merge_cores for block 2).
at::Tensor merge_pairs(at::Tensor sites) {
  check({{sites, "sites", 4}});
  const int64_t n2 = sites.size(0), D = sites.size(1), d = sites.size(2), n = n2 / 2;
  TORCH_CHECK(n2 % 2 == 0 && sites.size(3) == D, "chain_scan: inconsistent shapes");
  auto merged = at::empty({n, D * d * d, D}, sites.options());
  const int64_t row = d * D, site = D * d * D;
  AT_DISPATCH_FLOATING_TYPES(sites.scalar_type(), "merge_pairs", [&] {
    using T = scalar_t;
    const T* a_ptr = sites.data_ptr<T>();
    T* m_ptr = merged.data_ptr<T>();
    at::parallel_for(0, n, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const T* a1 = a_ptr + 2 * blk * site;  // [(l, s1)][c], then A2 [c][(s2, r)]
        small_matmul(a1, D, 1, D * d, D, a1 + site, row, row, m_ptr + blk * site * d, row);
      }
    });
  });
  return merged;
}

// Block features straight from the feature map's (B, N, d) output: the n padded sites read
// features[:, source[i]] (an identity site, source N, reads e_0), and a block's features are the
// outer product of its `block` sites' (tnkd.tn.chain._block_features) -> (n / block, d^block, B).
at::Tensor block_features(at::Tensor features, at::Tensor source, int64_t block) {
  check({{features, "features", 3}, {source, "source", 1}});
  const int64_t B = features.size(0), N = features.size(1), d = features.size(2);
  const int64_t n = source.size(0), blocks = n / block;
  int64_t m = 1;
  for (int64_t j = 0; j < block; ++j) m *= d;
  TORCH_CHECK(n % block == 0 && source.scalar_type() == at::kLong, "chain_scan: bad source");
  auto out = at::empty({blocks, m, B}, features.options());
  const int64_t* src = source.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(src[i] >= 0 && src[i] <= N, "chain_scan: source site out of range");
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "block_features", [&] {
    using T = scalar_t;
    const T* f = features.data_ptr<T>();
    T* o = out.data_ptr<T>();
    std::vector<T> site(d * B), prod(m * B), next(m * B);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      for (int64_t j = 0, width = 1; j < block; ++j, width *= d) {  // width: d^j
        const int64_t at = src[blk * block + j];
        T* dst = j == 0 ? prod.data() : site.data();
        for (int64_t s = 0; s < d; ++s)
          for (int64_t b = 0; b < B; ++b)
            dst[s * B + b] = at == N ? T(s == 0) : f[(b * N + at) * d + s];
        if (j == 0) continue;
        for (int64_t p = 0; p < width; ++p)
          for (int64_t s = 0; s < d; ++s)
            for (int64_t b = 0; b < B; ++b)
              next[(p * d + s) * B + b] = prod[p * B + b] * site[s * B + b];
        std::swap(prod, next);
      }
      std::copy(prod.begin(), prod.end(), o + blk * m * B);
    }
  });
  return out;
}

// The output core of an MPS between the ends of its two halves, u = ends[0] and w = ends[1], (D, B)
// each: values[b][c] = sum_{l, r} u[l][b] O[l][c][r] w[r][b], divided by their max-abs per sample.
// Returns the (B, C) normalised values, the (B,) log-scales logs[0] + logs[1] + log(scale), and for
// mps_output_backward ow[l][c][b] = sum_r O[l][c][r] w[r][b] (D, C, B) and the (B,) scales.
std::vector<at::Tensor> mps_output_forward(at::Tensor ends, at::Tensor out_core, at::Tensor logs) {
  check_output(ends, out_core);
  check({{logs, "logs", 2}});
  const int64_t D = ends.size(1), B = ends.size(2), C = out_core.size(1);
  TORCH_CHECK(logs.size(0) == 2 && logs.size(1) == B, "chain_scan: logs (2, B) expected");
  auto values = at::empty({B, C}, ends.options());
  auto log_scale = at::empty({B}, ends.options());
  auto ow = at::empty({D, C, B}, ends.options());
  auto scale = at::empty({B}, ends.options());
  AT_DISPATCH_FLOATING_TYPES(ends.scalar_type(), "mps_output_forward", [&] {
    using T = scalar_t;
    const T* u = ends.data_ptr<T>();
    const T* lg = logs.data_ptr<T>();
    T* owp = ow.data_ptr<T>();
    T* sp = scale.data_ptr<T>();
    T* vp = values.data_ptr<T>();
    T* lp = log_scale.data_ptr<T>();
    std::vector<T> val(C * B, T(0));
    small_matmul(out_core.data_ptr<T>(), D, 1, D * C, D, u + D * B, B, B, owp, B);
    for (int64_t lc = 0; lc < D * C; ++lc)
      for (int64_t b = 0; b < B; ++b) val[(lc % C) * B + b] += owp[lc * B + b] * u[lc / C * B + b];
    normalise_columns(val.data(), C, B, sp);
    for (int64_t b = 0; b < B; ++b) {
      lp[b] = lg[b] + lg[B + b] + std::log(sp[b]);
      for (int64_t c = 0; c < C; ++c) vp[b * C + c] = val[c * B + b];
    }
  });
  return {values, log_scale, ow, scale};
}

// The vector-Jacobian product of mps_output_forward (the scales are constants): from the
// (B, C) gradient of the normalised values, the gradients of the ends (2, D, B),
// g_u[l][b] = sum_c ow[l][c][b] g'[c][b] and g_w[r][b] = sum_{l, c} O[l][c][r] u[l][b] g'[c][b]
// with g'[c][b] = grad[b][c] / scale[b], and, with core_grad, of the output core,
// g_O[l][c][r] = sum_b u[l][b] g'[c][b] w[r][b] (else an undefined tensor).
std::vector<at::Tensor> mps_output_backward(at::Tensor grad, at::Tensor ends, at::Tensor out_core,
                                            at::Tensor ow, at::Tensor scale, bool core_grad) {
  check_output(ends, out_core);
  check({{grad, "grad", 2}, {ow, "ow", 3}, {scale, "scale", 1}});
  const int64_t D = ends.size(1), B = ends.size(2), C = out_core.size(1);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == C && ow.size(0) == D && ow.size(1) == C &&
                  ow.size(2) == B && scale.size(0) == B,
              "chain_scan: inconsistent shapes");
  auto g_ends = at::zeros({2, D, B}, ends.options());
  auto g_core = core_grad ? at::empty({D, C, D}, ends.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(ends.scalar_type(), "mps_output_backward", [&] {
    using T = scalar_t;
    const T* gp = grad.data_ptr<T>();
    const T* sp = scale.data_ptr<T>();
    const T* u = ends.data_ptr<T>();
    const T* owp = ow.data_ptr<T>();
    T* gu = g_ends.data_ptr<T>();
    std::vector<T> gt(C * B), ug(D * C * B);  // g' (C, B); ug[l][c][b] = u[l][b] g'[c][b]
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) gt[c * B + b] = gp[b * C + c] / sp[b];
    for (int64_t lc = 0; lc < D * C; ++lc) {
      const T* g = gt.data() + (lc % C) * B;
      for (int64_t b = 0; b < B; ++b) {
        gu[lc / C * B + b] += owp[lc * B + b] * g[b];
        ug[lc * B + b] = u[lc / C * B + b] * g[b];
      }
    }
    small_matmul(out_core.data_ptr<T>(), 1, D, D, D * C, ug.data(), B, B, gu + D * B, B);
    if (core_grad) {
      const int64_t ldv = padded_width<T>(D);
      std::vector<T> wt(B * ldv, T(0));
      for (int64_t r = 0; r < D; ++r)
        for (int64_t b = 0; b < B; ++b) wt[b * ldv + r] = u[(D + r) * B + b];
      gram<T, false>(ug.data(), D * C, B, wt.data(), ldv, B, g_core.data_ptr<T>(), D);
    }
  });
  return {g_ends, g_core};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("merge_pairs", &merge_pairs, "merged cores of pairs of sites");
  module.def("block_features", &block_features, "block features from (B, N, d) features");
  module.def("mps_output_forward", &mps_output_forward, "MPS output core, forward");
  module.def("mps_output_backward", &mps_output_backward, "MPS output core, backward");
  module.def("unmerge_pairs", &unmerge_pairs, "site-pair gradients from merged-block gradients");
  module.def("scan_forward", &scan_forward, "boundary-vector scan, forward");
  module.def("scan_backward", &scan_backward, "boundary-vector scan, backward");
}
