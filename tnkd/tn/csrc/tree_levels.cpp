// The level loop of tnkd.tn.fused.FastTree (a binary tree of pair steps) as native loops.
//
// tree_forward / tree_backward: the same math as tnkd.tn.fused.tree_forward / tree_backward.
// Level k joins G nodes W[g, a, b, p] with their two children, each a row (A, n) of a block
// or of an earlier level's result (named per node: slot and row):
//
//     out[g, p, c] = sum_{a, b} W[g, a, b, p] left[g, a, c] right[g, b, c]
//
// optionally divided per (node, sample) by its max-abs over p (clamped at the smallest normal
// float; the divisors are returned, their logs sum to the root's log-scale). Backward, with
// G = grad / divisor:
//
//     g_W[g, a, b, p] = sum_c left[a, c] right[b, c] G[p, c]
//     gO[(a, b), c]   = sum_p W[a, b, p] G[p, c]
//     g_left[a, c]    = sum_b gO[(a, b), c] right[b, c]
//     g_right[b, c]   = sum_a gO[(a, b), c] left[a, c]
//
// Threads never meet between levels (the Python loop pays one ATen dispatch, and one parallel
// region, per kernel and level): subtrees are independent, and so are samples. Where every
// level reads the one below in pairs (a balanced tree), thread t runs all levels of its own subtrees on
// every column of the batch, and the levels with fewer nodes than threads (the root, ...) run
// on one thread after them (before them, backward); each weight's gradient is written by one
// thread. Other plans split the batch (the last, contiguous axis n) into per-thread column
// ranges, each thread running every level on its range and accumulating the weights' gradients
// (sums over the batch) into its own buffer, summed at the end (see Split). Inside a thread, a
// node's columns go in chunks of at most 4 SIMD registers, with the chunk's outer product
// left (x) right in an L1-sized scratch: the forward product is a register-tiled matrix product
// along the columns, g_W a product with the batch as the reduction (the gradient transposed, so
// no horizontal sums), through Q = right (x) G where P is narrower than a register. The
// optional head (logits exp(s) v / ||v|| of the root v, and its backward) is computed here too.
//
// With `linear`, level 0's left child is a (G, 2, n) tensor of raw pairs [x_l, x_r] (any
// strides), and its children are the [1, x] features [1, x_l] and [1, x_r] (A = B = 2), made
// on the fly; the raw pairs get no gradient.

#include <torch/extension.h>

#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace {

using namespace tnkd_simd;

// out (rows, nv*L) = A (rows, depth) @ x (depth, nv*L), both scratch with row stride ld.
template <typename T>
void matmul(const T* a, int64_t ar, int64_t ak, int64_t rows, int64_t depth, const T* x,
            int64_t nv, int64_t ld, T* out) {
  constexpr int64_t L = Vec<T>::lanes;
  const Strides st{ar, 0, ak};
  switch (nv) {
    case 1: mm_rows<T, 6, 1>(a, st, 1, depth, rows, x, ld, out, ld, 0, L); break;
    case 2: mm_rows<T, 6, 2>(a, st, 1, depth, rows, x, ld, out, ld, 0, 2 * L); break;
    case 3: mm_rows<T, 4, 3>(a, st, 1, depth, rows, x, ld, out, ld, 0, 3 * L); break;
    default: mm_rows<T, 4, 4>(a, st, 1, depth, rows, x, ld, out, ld, 0, 4 * L); break;
  }
}

// gw (rows, P) += o (rows, cols) @ gt (cols, ldg); ldg >= P rounded up to whole registers.
template <typename T>
void gram(const T* o, int64_t rows, int64_t ldo, const T* gt, int64_t ldg, int64_t cols, T* gw,
          int64_t P) {
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t p0 = 0; p0 < P; p0 += 2 * L) {
    if (P - p0 > L)
      gram_rows<T, 2, true>(o, rows, ldo, gt, ldg, cols, gw, P, p0);
    else
      gram_rows<T, 1, true>(o, rows, ldo, gt, ldg, cols, gw, P, p0);
  }
}

// A child: element (node, row, column) at ptr[node*sn + row*sr + column*sc].
template <typename T>
struct Child {
  T* ptr;
  int64_t sn, sr, sc;
};

// d[0..cols) = s[0..cols): whole registers copied as such (a memcpy call per short row cost
// more), then the rest one by one.
template <typename T>
inline void copy_row(const T* s, int64_t cols, T* d) {
  constexpr int64_t L = Vec<T>::lanes;
  int64_t c = 0;
  for (; c + L <= cols; c += L) store(d + c, load(s + c));
  for (; c < cols; ++c) d[c] = s[c];
}

// dst[r][0..width) = src rows r (columns c0..c0+cols), zero from cols on (width: whole
// registers).
template <typename T>
inline void load_rows(const T* src, int64_t sr, int64_t sc, int64_t rows, int64_t cols,
                      int64_t width, T* dst) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * sr;
    T* d = dst + r * width;
    if (sc == 1) {
      copy_row(s, cols, d);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c * sc];
    }
    if (cols < width) {
      const int64_t v0 = cols / L * L;  // the partial register: its tail zeroed
      for (int64_t q = cols; q < v0 + L; ++q) d[q] = 0;
      for (int64_t q = v0 + L; q < width; q += L) store(d + q, V{});
    }
  }
}

template <typename T>
inline void store_rows(const T* src, int64_t rows, int64_t width, int64_t cols, T* dst,
                       int64_t sr) {
  for (int64_t r = 0; r < rows; ++r) copy_row(src + r * width, cols, dst + r * sr);
}

// A child's gradient rows from scratch (rows, width): written, or added to with `add`.
template <typename T>
inline void give(const T* src, int64_t rows, int64_t width, int64_t cols, const Child<T>& dst,
                 int64_t c0, bool add) {
  T* d = dst.ptr + c0 * dst.sc;
  if (!add && dst.sc == 1) {
    store_rows(src, rows, width, cols, d, dst.sr);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      T& x = d[r * dst.sr + c * dst.sc];
      x = add ? x + src[r * width + c] : src[r * width + c];
    }
}

// o[(a, b)][:] = l[a][:] r[b][:] over `nv` registers.
template <typename T>
inline void outer(const T* l, int64_t A, const T* r, int64_t B, int64_t nv, int64_t width, T* o) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t a = 0; a < A; ++a)
    for (int64_t n = 0; n < nv; ++n) {
      const V lv = load(l + a * width + n * L);
      for (int64_t b = 0; b < B; ++b)
        store(o + (a * B + b) * width + n * L, lv * load(r + b * width + n * L));
    }
}

// 64-byte aligned scratch, not initialised.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> data;
  T* base;
  explicit Scratch(int64_t size) : data(new T[size + 64 / sizeof(T)]) {
    auto p = reinterpret_cast<std::uintptr_t>(data.get());
    base = reinterpret_cast<T*>((p + 63) / 64 * 64);
  }
};

struct Level {
  int64_t w;
  bool renorm;
  int64_t nodes, A, B, P;
  int64_t first;  // where its nodes' children start in the plan's lists
  bool need_children = false;  // (backward) some child's gradient is needed
};

// A node's children: left (slot, row) and right (slot, row); a slot is a block, or (from
// `blocks` on) an earlier level's result.
struct Plan {
  std::vector<Level> levels;
  std::vector<int64_t> ls, lr, rs, rr;
  int64_t blocks, n;
  bool linear;
  int64_t max_ab = 1, max_a = 1, max_p = 1;
};

Plan make_plan(const std::vector<at::Tensor>& blocks, const std::vector<int64_t>& w,
               std::vector<int64_t> ls, std::vector<int64_t> lr, std::vector<int64_t> rs,
               std::vector<int64_t> rr, const std::vector<bool>& renorm, bool linear, int64_t n) {
  const int64_t K = w.size();
  TORCH_CHECK(K > 0 && (int64_t)renorm.size() == K,
              "tree_levels: the plan's lists must have one entry per level");
  Plan plan{{}, std::move(ls), std::move(lr), std::move(rs), std::move(rr),
            (int64_t)blocks.size(), n, linear};
  const int64_t total = plan.ls.size();
  TORCH_CHECK((int64_t)plan.lr.size() == total && (int64_t)plan.rs.size() == total &&
                  (int64_t)plan.rr.size() == total,
              "tree_levels: the children's lists must have one entry per node");
  // a slot's (nodes, rows): a (G, X, n) block or an earlier level's (G, P, n) result
  auto shape = [&](int64_t slot) -> std::pair<int64_t, int64_t> {
    if (slot >= plan.blocks) {
      const Level& below = plan.levels[slot - plan.blocks];
      return {below.nodes, below.P};
    }
    const at::Tensor& b = blocks[slot];
    TORCH_CHECK(b.dim() == 3, "tree_levels: a child block must be (G, A, n), got ", b.dim(),
                " dimensions");
    return {b.size(0), b.size(1)};
  };
  int64_t first = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(w[k] >= 0 && w[k] < plan.blocks, "tree_levels: a weight must be a block");
    const at::Tensor& wt = blocks[w[k]];
    TORCH_CHECK(wt.dim() == 4, "tree_levels: weights must be (G, A, B, P), got ", wt.dim(),
                " dimensions");
    Level lv{w[k], renorm[k], wt.size(0), wt.size(1), wt.size(2), wt.size(3), first};
    TORCH_CHECK(first + lv.nodes <= total, "tree_levels: level ", k, " has no children listed");
    for (int64_t i = first; i < first + lv.nodes; ++i) {
      for (const auto& [slot, row, rows] : {std::tuple{plan.ls[i], plan.lr[i], lv.A},
                                            std::tuple{plan.rs[i], plan.rr[i], lv.B}}) {
        TORCH_CHECK(slot >= 0 && slot < plan.blocks + k,
                    "tree_levels: a level reads a block or an earlier level's result");
        const auto [sn, sr] = shape(slot);
        const int64_t want = linear && k == 0 ? 2 : rows;
        TORCH_CHECK(row >= 0 && row < sn && sr == want, "tree_levels: level ", k,
                    " expects children of ", want, " rows, got a (", sn, ", ", sr,
                    ", n) slot (row ", row, ")");
      }
    }
    TORCH_CHECK(!(linear && k == 0) || (lv.A == 2 && lv.B == 2),
                "tree_levels: [1, x] leaves need (G, 2, 2, P) weights and (G, 2, n) pairs");
    first += lv.nodes;
    plan.max_ab = std::max(plan.max_ab, lv.A * lv.B);
    plan.max_a = std::max({plan.max_a, lv.A, lv.B});
    plan.max_p = std::max(plan.max_p, lv.P);
    plan.levels.push_back(lv);
  }
  TORCH_CHECK(first == total, "tree_levels: ", total, " children listed for ", first, " nodes");
  return plan;
}

// The columns of task t of `tasks`: whole registers, split as evenly as they go.
template <typename T>
std::pair<int64_t, int64_t> columns(int64_t t, int64_t tasks, int64_t n) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t regs = (n + L - 1) / L;
  const int64_t r0 = t * regs / tasks, r1 = (t + 1) * regs / tasks;
  return {std::min(n, r0 * L), std::min(n, r1 * L)};
}

template <typename T>
int64_t task_count(int64_t n) {
  const int64_t regs = (n + Vec<T>::lanes - 1) / Vec<T>::lanes;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), regs));
}

// Registers per chunk: the outer product (A*B rows) within about 32 KB, at most 4.
template <typename T>
int64_t chunk_registers(int64_t max_ab) {
  const int64_t fit = (32 * 1024) / (max_ab * 64);
  return std::max<int64_t>(1, std::min<int64_t>(4, fit));
}

// The children of node g at level k: (left, right) element pointers and strides.
template <typename T>
std::pair<Child<T>, Child<T>> children(const Plan& plan, const Level& lv, int64_t g,
                                       const std::vector<Child<T>>& slots) {
  const int64_t i = lv.first + g;
  Child<T> left = slots[plan.ls[i]], right = slots[plan.rs[i]];
  left.ptr += plan.lr[i] * left.sn;
  right.ptr += plan.rr[i] * right.sn;
  return {left, right};
}

template <typename T>
Child<T> as_child(const at::Tensor& t) {
  return Child<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Level k's children of node g for columns c0..c0+cols into ls (A rows), rs (B rows).
template <typename T>
inline void load_children(const Plan& plan, int64_t k, const Level& lv, const Child<T>& left,
                          const Child<T>& right, int64_t c0, int64_t cols, int64_t width, T* ls,
                          T* rs) {
  if (plan.linear && k == 0) {  // left: the raw pair [x_l, x_r] of node g
    for (int64_t c = 0; c < width; ++c) ls[c] = rs[c] = c < cols ? T(1) : T(0);
    const T* base = left.ptr + c0 * left.sc;
    load_rows(base, left.sr, left.sc, 1, cols, width, ls + width);
    load_rows(base + left.sr, left.sr, left.sc, 1, cols, width, rs + width);
    return;
  }
  load_rows(left.ptr + c0 * left.sc, left.sr, left.sc, lv.A, cols, width, ls);
  load_rows(right.ptr + c0 * right.sc, right.sr, right.sc, lv.B, cols, width, rs);
}

// How a pass is split between threads. By subtrees where the levels form a chain (the leaves
// read row g of two blocks, each level rows 2g and 2g + 1 of the one below: node g of level k
// depends only on nodes g 2^(k-j) ..
// (g+1) 2^(k-j) - 1 of level j <= k): task t runs levels 0..top-1 on its own subtrees, all
// columns, with no synchronisation and no shared weight gradients; the levels from `top` (fewer
// nodes than threads: the root, ...) run on one thread after them (before them, backward).
// Otherwise by columns: task t runs every level on its own columns of the batch, each task
// with its own weight-gradient buffer, summed at the end.
struct Split {
  bool subtrees;
  int64_t tasks, top;
};

template <typename T>
Split split_work(const Plan& plan) {
  const int64_t K = plan.levels.size(), threads = at::get_num_threads();
  bool chain = true;
  for (int64_t k = 0; k < K && chain; ++k) {
    const Level& lv = plan.levels[k];
    chain = k == 0 || 2 * lv.nodes == plan.levels[k - 1].nodes;
    for (int64_t g = 0; g < lv.nodes && chain; ++g) {
      const int64_t i = lv.first + g, below = plan.blocks + k - 1;
      chain = k == 0 ? plan.ls[i] == plan.ls[0] && plan.rs[i] == plan.rs[0] &&
                           plan.ls[0] < plan.blocks && plan.rs[0] < plan.blocks &&
                           plan.lr[i] == g && plan.rr[i] == g
                     : plan.ls[i] == below && plan.rs[i] == below && plan.lr[i] == 2 * g &&
                           plan.rr[i] == 2 * g + 1;
    }
  }
  if (threads > 1 && chain) {
    int64_t top = 0;
    while (top < K && plan.levels[top].nodes >= threads) ++top;
    if (top > 0) return {true, threads, top};
  }
  return {false, task_count<T>(plan.n), K};
}

// The nodes of level k < top in task t's subtrees.
inline std::pair<int64_t, int64_t> subtree_nodes(const Plan& plan, const Split& split, int64_t t,
                                                 int64_t k) {
  const int64_t G = plan.levels[split.top - 1].nodes;
  const int64_t f = plan.levels[k].nodes / G;  // 2^(top - 1 - k)
  return {t * G / split.tasks * f, (t + 1) * G / split.tasks * f};
}

// The smallest and largest divisor seen, and whether one was NaN.
struct Range {
  double low = std::numeric_limits<double>::infinity();
  double high = -std::numeric_limits<double>::infinity();
  bool nan = false;
  void see(double v) {
    if (std::isnan(v)) nan = true;
    low = std::min(low, v);
    high = std::max(high, v);
  }
};

template <typename T>
struct ForwardScratch {
  Scratch<T> ls, rs, o, out;
  ForwardScratch(const Plan& plan, int64_t width)
      : ls(plan.max_a * width), rs(plan.max_a * width), o(plan.max_ab * width),
        out(plan.max_p * width) {}
};

using Forward = std::tuple<std::vector<at::Tensor>, at::Tensor, double, double, at::Tensor,
                           at::Tensor>;

template <typename T>
Forward forward_impl(const std::vector<at::Tensor>& blocks, const Plan& plan, bool square,
                     bool head, double log_scale) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t n = plan.n, K = plan.levels.size();
  const auto options = blocks[plan.levels[0].w].options();
  std::vector<Child<T>> slots;
  for (const auto& b : blocks)
    slots.push_back(b.dim() == 3 ? as_child<T>(b) : Child<T>{nullptr, 0, 0, 0});
  std::vector<at::Tensor> outs;
  std::vector<int64_t> first;  // each level's first divisor row (-1: not renormalised)
  int64_t rows = 0;
  for (const auto& lv : plan.levels) {
    outs.push_back(at::empty({lv.nodes, lv.P, n}, options));
    slots.push_back(as_child<T>(outs.back()));
    first.push_back(lv.renorm ? rows : -1);
    if (lv.renorm) rows += lv.nodes;
  }
  const int64_t square_row = rows;
  at::Tensor divisors = at::empty({rows + (square ? 1 : 0), 1, n}, options);
  T* div = divisors.data_ptr<T>();
  const int64_t width = chunk_registers<T>(plan.max_ab) * L;
  const T tiny = std::numeric_limits<T>::min();
  // the head: logits (n, C) = exp(s) v / ||v|| of the root v, and 1 / ||v|| per sample
  at::Tensor logits, inverse;
  const T scale = std::exp(static_cast<T>(log_scale));
  const int64_t classes = plan.levels.back().P;
  if (head) {
    logits = at::empty({n, classes}, options);
    inverse = at::empty({n}, options);
  }

  // levels k0..k1-1, the nodes nodes(k) of each, columns cbegin..cend
  auto run = [&](int64_t k0, int64_t k1, auto nodes, int64_t cbegin, int64_t cend, Range& range,
                 ForwardScratch<T>& sc) {
    for (int64_t k = k0; k < k1; ++k) {
      const Level& lv = plan.levels[k];
      const T* weight = blocks[lv.w].data_ptr<T>();
      const Child<T> dst = slots[plan.blocks + k];
      const int64_t abp = lv.A * lv.B * lv.P;
      const auto [g0, g1] = nodes(k);
      for (int64_t g = g0; g < g1; ++g) {
        const auto [left, right] = children<T>(plan, lv, g, slots);
        const T* wg = weight + g * abp;
        for (int64_t c0 = cbegin; c0 < cend; c0 += width) {
          const int64_t cols = std::min(width, cend - c0);
          const int64_t nv = (cols + L - 1) / L;
          T* out = sc.out.base;
          load_children(plan, k, lv, left, right, c0, cols, width, sc.ls.base, sc.rs.base);
          outer(sc.ls.base, lv.A, sc.rs.base, lv.B, nv, width, sc.o.base);
          // out[p][:] = sum_{ab} W[ab][p] o[ab][:]
          matmul(wg, 1, lv.P, lv.P, lv.A * lv.B, sc.o.base, nv, width, out);
          if (lv.renorm) {
            T* drow = div + (first[k] + g) * n + c0;
            for (int64_t v = 0; v < nv; ++v) {
              V peak = V{};
              for (int64_t p = 0; p < lv.P; ++p) {
                V x = load(out + p * width + v * L);
                V ax = x < 0 ? -x : x;
                peak = peak < ax ? ax : peak;
                peak = x != x ? x : peak;  // NaN stays visible (the range check then fails)
              }
              T lanes[L];
              store(lanes, peak);
              for (int64_t q = 0; q < L; ++q)
                lanes[q] = std::isnan(lanes[q]) ? lanes[q] : std::max(lanes[q], tiny);
              const V d = load(lanes);
              for (int64_t p = 0; p < lv.P; ++p) {
                T* row = out + p * width + v * L;
                store(row, load(row) / d);
              }
              const int64_t valid = std::min<int64_t>(L, cols - v * L);
              for (int64_t q = 0; q < valid; ++q) {
                drow[v * L + q] = lanes[q];
                range.see(lanes[q]);
              }
            }
          } else if (square && k == K - 1) {
            T* drow = div + square_row * n + c0;
            for (int64_t c = 0; c < cols; ++c) {
              T s = 0;
              for (int64_t p = 0; p < lv.P; ++p) s += out[p * width + c] * out[p * width + c];
              drow[c] = s;
              range.see(s);
            }
          }
          store_rows(out, lv.P, width, cols, dst.ptr + g * dst.sn + c0, dst.sr);
        }
      }
    }
  };
  // as FastTree's Python head: 1 / ||v|| from the checked squared norms, or (every level
  // renormalised, max-abs 1) min(1 / ||v||, 1); then (v * inverse) * exp(s)
  auto run_head = [&](int64_t cbegin, int64_t cend) {
    const T* root = outs.back().data_ptr<T>();
    T* lg = logits.data_ptr<T>();
    T* inv = inverse.data_ptr<T>();
    for (int64_t c = cbegin; c < cend; ++c) {
      T i;
      if (square) {
        i = T(1) / std::sqrt(div[square_row * n + c]);
      } else {
        T sq = 0;
        for (int64_t p = 0; p < classes; ++p) sq += root[p * n + c] * root[p * n + c];
        i = std::min(T(1) / std::sqrt(sq), T(1));
      }
      inv[c] = i;
      for (int64_t p = 0; p < classes; ++p) lg[c * classes + p] = (root[p * n + c] * i) * scale;
    }
  };
  auto all_nodes = [&](int64_t k) { return std::pair<int64_t, int64_t>{0, plan.levels[k].nodes}; };

  const Split split = split_work<T>(plan);
  std::vector<Range> ranges(split.tasks + 1);
  if (split.subtrees) {
    at::parallel_for(0, split.tasks, 1, [&](int64_t t0, int64_t t1) {
      ForwardScratch<T> sc(plan, width);
      for (int64_t t = t0; t < t1; ++t)
        run(0, split.top, [&](int64_t k) { return subtree_nodes(plan, split, t, k); }, 0, n,
            ranges[t], sc);
    });
    ForwardScratch<T> sc(plan, width);
    run(split.top, K, all_nodes, 0, n, ranges[split.tasks], sc);
    if (head) run_head(0, n);
  } else {
    at::parallel_for(0, split.tasks, 1, [&](int64_t t0, int64_t t1) {
      ForwardScratch<T> sc(plan, width);
      for (int64_t t = t0; t < t1; ++t) {
        const auto [cbegin, cend] = columns<T>(t, split.tasks, n);
        run(0, K, all_nodes, cbegin, cend, ranges[t], sc);
        if (head) run_head(cbegin, cend);
      }
    });
  }
  Range range;
  for (const auto& r : ranges) {
    range.nan = range.nan || r.nan;
    range.low = std::min(range.low, r.low);
    range.high = std::max(range.high, r.high);
  }
  if (range.nan) range.low = range.high = std::numeric_limits<double>::quiet_NaN();
  return {outs, divisors, range.low, range.high, logits, inverse};
}

template <typename T>
struct BackwardScratch {
  Scratch<T> ls, rs, o, go, gs, gt, gl, gr, dv, qt;
  BackwardScratch(const Plan& plan, int64_t width, int64_t pad_p, int64_t pad_bp)
      : ls(plan.max_a * width), rs(plan.max_a * width), o(plan.max_ab * width),
        go(plan.max_ab * width), gs(plan.max_p * width), gt(width * pad_p),
        gl(plan.max_a * width), gr(plan.max_a * width), dv(width), qt(width * pad_bp) {}
};

template <typename T>
std::vector<at::Tensor> backward_impl(const std::vector<at::Tensor>& blocks,
                                      const std::vector<at::Tensor>& outs,
                                      const at::Tensor& divisors, const Plan& plan_in,
                                      const at::Tensor& grad_in,
                                      const std::vector<bool>& needs, const at::Tensor& inverse,
                                      double log_scale) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t n = plan_in.n, K = plan_in.levels.size(), nb = plan_in.blocks;
  // which slots' gradients are needed: the blocks' as asked, a level's if anything below it is
  std::vector<bool> need(needs.begin(), needs.end());
  need.resize(nb + K, false);
  Plan plan = plan_in;
  for (int64_t k = 0; k < K; ++k) {
    Level& lv = plan.levels[k];
    for (int64_t i = lv.first; i < lv.first + lv.nodes && !(plan.linear && k == 0); ++i)
      lv.need_children = lv.need_children || need[plan.ls[i]] || need[plan.rs[i]];
    need[nb + k] = need[lv.w] || lv.need_children;
  }
  const auto options = grad_in.options();
  // with the head, grad_in is the logits' (n, C) gradient: the root's comes first
  const bool head = inverse.defined();
  const int64_t classes = plan.levels.back().P;
  const at::Tensor grad_root = head ? at::empty({1, classes, n}, options) : grad_in;
  const T scale = std::exp(static_cast<T>(log_scale));
  std::vector<Child<T>> gslots(nb + K, Child<T>{nullptr, 0, 0, 0});
  std::vector<at::Tensor> grads(nb);
  for (int64_t s = 0; s < nb; ++s) {
    if (!need[s] || blocks[s].dim() != 3) continue;
    grads[s] = at::zeros(blocks[s].sizes(), options);  // several levels may read one block
    gslots[s] = as_child<T>(grads[s]);
  }
  std::vector<at::Tensor> level_grads(K);
  for (int64_t k = 0; k + 1 < K; ++k) {
    if (!need[nb + k]) continue;
    level_grads[k] = at::empty(outs[k].sizes(), options);
    gslots[nb + k] = as_child<T>(level_grads[k]);
  }
  gslots[nb + K - 1] = as_child<T>(grad_root);
  // the weights' gradients: each weight block at its offset in a buffer
  std::vector<int64_t> offset(nb, -1);
  int64_t total = 0;
  bool shared = false;  // a weight block in several levels: its buffer zeroed first, not per node
  for (const auto& lv : plan.levels) {
    if (!need[lv.w]) continue;
    if (offset[lv.w] >= 0) {
      shared = true;
      continue;
    }
    offset[lv.w] = total;
    total += blocks[lv.w].numel();
  }
  std::vector<Child<T>> slots;
  for (const auto& b : blocks)
    slots.push_back(b.dim() == 3 ? as_child<T>(b) : Child<T>{nullptr, 0, 0, 0});
  for (const auto& o : outs) slots.push_back(as_child<T>(o));
  std::vector<int64_t> first;
  int64_t rows = 0;
  for (const auto& lv : plan.levels) {
    first.push_back(lv.renorm ? rows : -1);
    if (lv.renorm) rows += lv.nodes;
  }
  const T* div = divisors.data_ptr<T>();
  const int64_t width = chunk_registers<T>(plan.max_ab) * L;
  const int64_t pad_p = (plan.max_p + L - 1) / L * L;
  int64_t pad_bp = L;  // Q's rows: B*P rounded up to whole registers, and one more (the spill)
  for (const auto& lv : plan.levels) pad_bp = std::max(pad_bp, (lv.B * lv.P + L - 1) / L * L);
  pad_bp += L;

  // d = v / ||v||: dL/dv = exp(s) (g - d (g . d)) / ||v||, dL/ds = exp(s) sum g . d; returns
  // the sum of g . d over columns cbegin..cend
  auto run_head = [&](int64_t cbegin, int64_t cend) {
    const T* root = outs.back().data_ptr<T>();
    const T* inv = inverse.data_ptr<T>();
    const T* g = grad_in.data_ptr<T>();
    const int64_t gs0 = grad_in.stride(0), gs1 = grad_in.stride(1);
    T* gv = grad_root.data_ptr<T>();
    T dot_sum = 0;
    for (int64_t c = cbegin; c < cend; ++c) {
      T dot = 0;
      for (int64_t p = 0; p < classes; ++p)
        dot += g[c * gs0 + p * gs1] * (root[p * n + c] * inv[c]);
      dot_sum += dot;
      const T factor = inv[c] * scale;
      for (int64_t p = 0; p < classes; ++p)
        gv[p * n + c] = (g[c * gs0 + p * gs1] - (root[p * n + c] * inv[c]) * dot) * factor;
    }
    return dot_sum;
  };
  // levels k_hi down to k_lo, the nodes nodes(k) of each, columns cbegin..cend; weight
  // gradients added into gw_all
  auto run = [&](int64_t k_hi, int64_t k_lo, auto nodes, int64_t cbegin, int64_t cend,
                 T* gw_all, BackwardScratch<T>& sc) {
    for (int64_t k = k_hi; k >= k_lo; --k) {
      const Level& lv = plan.levels[k];
      if (!need[nb + k]) continue;
      const bool need_w = need[lv.w];
      const bool need_children = lv.need_children;
      const T* weight = blocks[lv.w].data_ptr<T>();
      const Child<T> gsrc = gslots[nb + k];
      const int64_t ab = lv.A * lv.B, abp = ab * lv.P;
      const int64_t ldg = (lv.P + L - 1) / L * L;
      const int64_t ldq = (lv.B * lv.P + L - 1) / L * L + L;
      // g_W as a product with (A, B) rows and P wide registers, or A rows and (B, P) wide ones
      // (through Q = right (x) G, transposed): fewer instructions where P < L (D = 8 floats)
      const bool by_q = lv.A * (ldq / L - 1) + lv.B * (ldg / L) < ab * (ldg / L);
      const auto [g0, g1] = nodes(k);
      for (int64_t g = g0; g < g1; ++g) {
        const auto [left, right] = children<T>(plan, lv, g, slots);
        const auto [gleft, gright] = children<T>(plan, lv, g, gslots);
        const T* wg = weight + g * abp;
        T* gw = need_w ? gw_all + offset[lv.w] + g * abp : nullptr;
        if (need_w && !shared) std::fill(gw, gw + abp, T(0));
        for (int64_t c0 = cbegin; c0 < cend; c0 += width) {
          const int64_t cols = std::min(width, cend - c0);
          const int64_t nv = (cols + L - 1) / L;
          // G[p][:] = grad / divisor, zero past the columns
          const T* grow = gsrc.ptr + g * gsrc.sn + c0 * gsrc.sc;
          load_rows(grow, gsrc.sr, gsrc.sc, lv.P, cols, width, sc.gs.base);
          if (lv.renorm) {  // the divisors padded with ones, then whole registers
            const T* drow = div + (first[k] + g) * n + c0;
            for (int64_t c = 0; c < width; ++c) sc.dv.base[c] = c < cols ? drow[c] : T(1);
            for (int64_t v = 0; v < nv; ++v) {
              const V d = load(sc.dv.base + v * L);
              for (int64_t p = 0; p < lv.P; ++p) {
                T* row = sc.gs.base + p * width + v * L;
                store(row, load(row) / d);
              }
            }
          }
          load_children(plan, k, lv, left, right, c0, cols, width, sc.ls.base, sc.rs.base);
          if (need_w) {
            // G transposed, (cols, ldg): lanes P..ldg are left as they are (the products
            // below compute them, but only lanes below P are kept)
            for (int64_t c = 0; c < cols; ++c) {
              T* row = sc.gt.base + c * ldg;
              for (int64_t p = 0; p < lv.P; ++p) row[p] = sc.gs.base[p * width + c];
            }
            if (by_q) {
              // Q[c][(b, p)] = right[b][c] G[p][c]; g_W[a][(b, p)] = sum_c left[a][c] Q[c][(b, p)]
              // (whole registers per b: each spills past b's P lanes, into b + 1's, written next)
              for (int64_t c = 0; c < cols; ++c) {
                const T* grow_t = sc.gt.base + c * ldg;
                T* q = sc.qt.base + c * ldq;
                for (int64_t b = 0; b < lv.B; ++b) {
                  const T rv = sc.rs.base[b * width + c];
                  for (int64_t p0 = 0; p0 < lv.P; p0 += L)
                    store(q + b * lv.P + p0, rv * load(grow_t + p0));
                }
              }
              gram(sc.ls.base, lv.A, width, sc.qt.base, ldq, cols, gw, lv.B * lv.P);
            } else {  // g_W[(a, b)][p] = sum_c (left (x) right)[(a, b)][c] G[c][p]
              outer(sc.ls.base, lv.A, sc.rs.base, lv.B, nv, width, sc.o.base);
              gram(sc.o.base, ab, width, sc.gt.base, ldg, cols, gw, lv.P);
            }
          }
          if (!need_children) continue;
          // gO[ab][:] = sum_p W[ab][p] G[p][:]
          T* go = sc.go.base;
          matmul(wg, lv.P, 1, ab, lv.P, sc.gs.base, nv, width, go);
          for (int64_t v = 0; v < nv; ++v) {
            for (int64_t a = 0; a < lv.A; ++a) {
              V acc = V{};
              for (int64_t b = 0; b < lv.B; ++b)
                acc += load(go + (a * lv.B + b) * width + v * L) *
                       load(sc.rs.base + b * width + v * L);
              store(sc.gl.base + a * width + v * L, acc);
            }
            for (int64_t b = 0; b < lv.B; ++b) {
              V acc = V{};
              for (int64_t a = 0; a < lv.A; ++a)
                acc += load(go + (a * lv.B + b) * width + v * L) *
                       load(sc.ls.base + a * width + v * L);
              store(sc.gr.base + b * width + v * L, acc);
            }
          }
          // a level's result feeds one parent (written); a block may feed several (added)
          const int64_t l_slot = plan.ls[lv.first + g], r_slot = plan.rs[lv.first + g];
          if (need[l_slot]) give(sc.gl.base, lv.A, width, cols, gleft, c0, l_slot < nb);
          if (need[r_slot]) give(sc.gr.base, lv.B, width, cols, gright, c0, r_slot < nb);
        }
      }
    }
  };
  auto all_nodes = [&](int64_t k) { return std::pair<int64_t, int64_t>{0, plan.levels[k].nodes}; };

  const Split split = split_work<T>(plan);
  const int64_t buffers = split.subtrees ? 1 : split.tasks;
  at::Tensor g_weights = at::empty({buffers, std::max<int64_t>(total, 1)}, options);
  if (shared) g_weights.zero_();
  std::vector<T> dots(split.tasks, T(0));
  if (split.subtrees) {
    T* gw_all = g_weights.data_ptr<T>();
    if (head) dots[0] = run_head(0, n);
    BackwardScratch<T> sc(plan, width, pad_p, pad_bp);
    run(K - 1, split.top, all_nodes, 0, n, gw_all, sc);
    at::parallel_for(0, split.tasks, 1, [&](int64_t t0, int64_t t1) {
      BackwardScratch<T> sc(plan, width, pad_p, pad_bp);
      for (int64_t t = t0; t < t1; ++t)
        run(split.top - 1, 0, [&](int64_t k) { return subtree_nodes(plan, split, t, k); }, 0, n,
            gw_all, sc);
    });
  } else {
    at::parallel_for(0, split.tasks, 1, [&](int64_t t0, int64_t t1) {
      BackwardScratch<T> sc(plan, width, pad_p, pad_bp);
      for (int64_t t = t0; t < t1; ++t) {
        const auto [cbegin, cend] = columns<T>(t, split.tasks, n);
        if (head) dots[t] = run_head(cbegin, cend);
        run(K - 1, 0, all_nodes, cbegin, cend, g_weights.data_ptr<T>() + t * g_weights.size(1),
            sc);
      }
    });
  }
  at::Tensor summed = buffers > 1 ? g_weights.sum(0) : g_weights[0];
  for (int64_t s = 0; s < nb; ++s)
    if (offset[s] >= 0)
      grads[s] = summed.narrow(0, offset[s], blocks[s].numel()).view(blocks[s].sizes());
  if (head) {
    T dot = 0;
    for (const T d : dots) dot += d;
    grads.push_back(at::scalar_tensor(dot * scale, options));
  }
  return grads;
}

std::vector<at::Tensor> prepare(const std::vector<at::Tensor>& blocks, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(blocks.size());
  for (const auto& b : blocks) {
    TORCH_CHECK(b.device().is_cpu(), "tree_levels: blocks must be on the CPU");
    TORCH_CHECK(b.scalar_type() == blocks[0].scalar_type(),
                "tree_levels: all blocks must have one dtype");
    TORCH_CHECK(b.dim() != 3 || b.size(2) == n, "tree_levels: every input's batch must be ", n,
                ", got ", b.size(2));
    out.push_back(b.dim() == 4 ? b.contiguous() : b);
  }
  return out;
}

// Returns (level results, divisors (R, 1, n), smallest and largest divisor (NaN if one is),
// logits (n, C), 1 / ||root|| (n)); the last two undefined (None) without `head` (log_scale s).
Forward tree_forward(std::vector<at::Tensor> blocks, std::vector<int64_t> w,
                     std::vector<int64_t> ls, std::vector<int64_t> lr, std::vector<int64_t> rs,
                     std::vector<int64_t> rr, std::vector<bool> renorm, bool linear, bool square,
                     c10::optional<double> log_scale) {
  TORCH_CHECK(!ls.empty() && ls[0] >= 0 && ls[0] < (int64_t)blocks.size() &&
                  blocks[ls[0]].dim() == 3,
              "tree_levels: the first level's children must be (G, A, n) blocks");
  const int64_t n = blocks[ls[0]].size(2);
  blocks = prepare(blocks, n);
  const Plan plan = make_plan(blocks, w, ls, lr, rs, rr, renorm, linear, n);
  Forward result;
  AT_DISPATCH_FLOATING_TYPES(blocks[0].scalar_type(), "tree_forward", [&] {
    result = forward_impl<scalar_t>(blocks, plan, square, log_scale.has_value(),
                                    log_scale.value_or(0.0));
  });
  return result;
}

std::vector<at::Tensor> tree_backward(std::vector<at::Tensor> blocks, std::vector<at::Tensor> outs,
                                      at::Tensor divisors, std::vector<int64_t> w,
                                      std::vector<int64_t> ls, std::vector<int64_t> lr,
                                      std::vector<int64_t> rs, std::vector<int64_t> rr,
                                      std::vector<bool> renorm, bool linear, at::Tensor grad,
                                      std::vector<bool> needs,
                                      c10::optional<at::Tensor> inverse,
                                      c10::optional<double> log_scale) {
  const int64_t n = outs.back().size(2);
  blocks = prepare(blocks, n);
  const Plan plan = make_plan(blocks, w, ls, lr, rs, rr, renorm, linear, n);
  TORCH_CHECK((int64_t)needs.size() == plan.blocks, "tree_levels: one need per block");
  const bool head = inverse.has_value();
  if (head) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == outs.back().size(1),
                "tree_levels: the logits' gradient must be (", n, ", ", outs.back().size(1),
                "), got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.sizes() == outs.back().sizes(), "tree_levels: the root's gradient must be ",
                outs.back().sizes(), ", got ", grad.sizes());
    grad = grad.contiguous();
  }
  grad = grad.to(blocks[0].scalar_type());
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(blocks[0].scalar_type(), "tree_backward", [&] {
    result = backward_impl<scalar_t>(blocks, outs, divisors.contiguous(), plan, grad, needs,
                                     head ? *inverse : at::Tensor(), log_scale.value_or(0.0));
  });
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("tree_forward", &tree_forward, "the levels of a binary tree, forward");
  module.def("tree_backward", &tree_backward, "the levels of a binary tree, backward");
}
